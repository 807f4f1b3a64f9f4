"""The normalisers against their formulas, gradients included: clipped softmax (exact zeros and ones, no
gradient through clipped entries), softmax1, learned sinks, softpick, sigmoid attention, clipped softmax1."""

import math

import pytest
import torch

from transformers_language import AttentionConfig
from transformers_language.models.softmax import (
    SOFTMAX_VARIANTS,
    LearnedSink,
    Softmax,
    build_softmax,
    clipped_softmax,
    softmax_with_sink,
    softpick,
)


def reference(scores, gamma, zeta):
    return torch.clip((zeta - gamma) * torch.softmax(scores.double(), -1) + gamma, 0, 1)


@pytest.mark.parametrize(("gamma", "zeta"), [(-0.025, 1.0), (0.0, 1.003), (-0.03, 1.03), (-0.2, 1.5)])
def test_matches_formula(gamma, zeta):
    scores = torch.randn(2, 3, 5, 7) * 3
    torch.testing.assert_close(
        clipped_softmax(scores, gamma, zeta).double(), reference(scores, gamma, zeta), rtol=1e-6, atol=1e-6
    )


def test_clipped_0_1_is_vanilla_with_same_gradient():
    scores = torch.randn(2, 4, 6, 6, requires_grad=True)
    weights = torch.randn(2, 4, 6, 6)
    (clipped_softmax(scores, 0.0, 1.0) * weights).sum().backward()
    grad_clipped = scores.grad.clone()
    scores.grad = None
    (torch.softmax(scores, -1) * weights).sum().backward()
    torch.testing.assert_close(clipped_softmax(scores, 0.0, 1.0), torch.softmax(scores, -1), rtol=0, atol=0)
    torch.testing.assert_close(grad_clipped, scores.grad)


def test_exact_zeros_and_ones_where_formula_says():
    gamma, zeta = -0.1, 1.2
    scale = zeta - gamma
    # Row 0: one dominant entry -> its probability is above (1 - gamma) / (zeta - gamma) -> exactly 1;
    # the small ones are below -gamma / (zeta - gamma) -> exactly 0.
    scores = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(scores, -1)
    out = clipped_softmax(scores, gamma, zeta)
    assert torch.equal(out == 0, probs < -gamma / scale)
    assert torch.equal(out == 1, probs > (1 - gamma) / scale)
    assert out[0, 0] == 1 and (out[0, 1:] == 0).all()
    torch.testing.assert_close(out[1], torch.full((4,), 0.25 * scale + gamma))  # uniform row: not clipped


def test_no_gradient_through_clipped_entries():
    gamma, zeta = -0.1, 1.2
    scores = torch.tensor([[10.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, -0.5]], requires_grad=True)
    out = clipped_softmax(scores, gamma, zeta)
    clipped = (out == 0) | (out == 1)
    assert clipped.any() and (~clipped).any()
    # Any loss that reads only clipped entries gives zero gradient.
    (out * clipped * torch.randn(2, 4)).sum().backward()
    assert torch.equal(scores.grad, torch.zeros_like(scores))
    # An unclipped entry does pass gradient, scaled by (zeta - gamma) as the formula says.
    scores.grad = None
    ref_scores = scores.detach().clone().requires_grad_(True)
    (clipped_softmax(scores, gamma, zeta)[1] * torch.arange(4.0)).sum().backward()
    (reference(ref_scores, gamma, zeta)[1] * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(scores.grad, ref_scores.grad.float())


def test_low_precision_input_keeps_dtype():
    scores = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    assert clipped_softmax(scores, -0.1, 1.0).dtype == torch.bfloat16
    for name in SOFTMAX_VARIANTS:
        config = AttentionConfig(softmax=name, train_seq_length=16)
        assert build_softmax(config, num_heads=3)(scores).dtype == torch.bfloat16, name


def test_registry_builds_by_idea():
    assert type(build_softmax(AttentionConfig(), 4)) is Softmax
    module = build_softmax(AttentionConfig(alpha=4, train_seq_length=128), 4)
    assert isinstance(module, Softmax) and module.clip == (pytest.approx(-4 / 128), 1.0)
    module = build_softmax(AttentionConfig(softmax="sink", alpha=4, train_seq_length=128), 4)
    assert isinstance(module, LearnedSink) and module.clip == (pytest.approx(-4 / 128), 1.0)
    for name, cls in SOFTMAX_VARIANTS.items():
        assert type(build_softmax(AttentionConfig(softmax=name, train_seq_length=16), 4)) is cls


# --- the later normalisers -------------------------------------------------------------------------------------

CAUSAL = torch.ones(6, 6, dtype=torch.bool).tril()


def masks() -> dict[str, torch.Tensor | None]:
    """No mask, BERT-style key padding (B, 1, 1, S) and OPT-style causal (T, S)."""
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    padding[1, ..., 4:] = False
    return {"unmasked": None, "padding": padding, "causal": CAUSAL}


def masked(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """What the attention function hands a normaliser: masked entries at the dtype's minimum."""
    return scores if allowed is None else scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


def build(name: str, **settings):
    return build_softmax(AttentionConfig(softmax=name, **settings), num_heads=3).double()


def random_scores(seed=0, scale=3.0):
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("mask", ["unmasked", "padding", "causal"])
def test_softmax1_is_softmax_with_an_appended_zero_key(mask):
    allowed = masks()[mask]
    scores = masked(random_scores(), allowed)
    extended = torch.cat([scores, torch.zeros(*scores.shape[:-1], 1, dtype=scores.dtype)], dim=-1)
    expected = torch.softmax(extended, -1)[..., :-1]  # the extra key's value is 0: its weight drops out
    torch.testing.assert_close(build("softmax1")(scores, allowed), expected, rtol=1e-6, atol=1e-7)
    assert (expected.sum(-1) < 1).all()


@pytest.mark.parametrize("mask", ["unmasked", "padding", "causal"])
def test_learned_sink_is_an_extra_key_with_its_logit_and_minus_inf_is_vanilla(mask):
    allowed = masks()[mask]
    scores = masked(random_scores(1), allowed)
    sink = build("sink")
    with torch.no_grad():
        sink.sink_logit.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    column = sink.sink_logit.detach().view(1, 3, 1, 1).expand(*scores.shape[:-1], 1)
    expected = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    torch.testing.assert_close(sink(scores, allowed), expected, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        sink.sink_logit.fill_(-math.inf)
    torch.testing.assert_close(sink(scores, allowed), torch.softmax(scores, -1), rtol=1e-6, atol=1e-7)  # float32 inside


def softpick_reference(scores, allowed, eps=1e-6):
    """The formula as written, in float64 without any shift (scores small enough not to overflow)."""
    e = torch.exp(scores) - 1
    if allowed is not None:
        e = e.masked_fill(~allowed, 0.0)
    return torch.relu(e) / (e.abs().sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("mask", ["unmasked", "padding", "causal"])
def test_softpick_matches_its_formula_with_exact_zeros(mask):
    allowed = masks()[mask]
    scores = masked(random_scores(2), allowed)
    out = build("softpick")(scores, allowed)
    torch.testing.assert_close(out, softpick_reference(scores, allowed), rtol=1e-9, atol=1e-12)
    assert (out[scores <= 0] == 0).all() and (out[scores > 0] > 0).all()  # exact zeros where e^s <= 1
    if allowed is not None:
        assert (out.masked_select(~allowed.expand_as(out)) == 0).all()
    assert (out.sum(-1) <= 1 + 1e-12).all()


def test_softpick_does_not_overflow_on_large_scores():
    scores = torch.tensor([[100.0, 99.0, -5.0], [-30.0, -40.0, -50.0]])
    out = softpick(scores, None)
    assert torch.isfinite(out).all()
    expected = torch.tensor([1.0, math.exp(-1), 0.0]) / (1 + math.exp(-1))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert (out[1] == 0).all()  # every score below 0: the head attends to nothing


@pytest.mark.parametrize("mask", ["unmasked", "padding", "causal"])
def test_sigmoid_attention_is_sigmoid_of_score_minus_log_t(mask):
    allowed = masks()[mask]
    scores = masked(random_scores(3), allowed)
    out = build("sigmoid", train_seq_length=128)(scores, allowed)
    expected = torch.sigmoid(scores - math.log(128))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    if allowed is not None:
        assert (out.masked_select(~allowed.expand_as(out)) == 0).all()


def test_clipped_softmax1_clips_softmax1():
    scores = random_scores(4)
    out = build("clipped_softmax1(-0.1:1.2)")(scores)
    expected = torch.clip(1.3 * softmax_with_sink(scores, 0.0).double() + -0.1, 0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert (out == 0).any()


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("softmax1", {}),
        ("sink", {}),
        ("softpick", {}),
        ("sigmoid", {"train_seq_length": 8}),
        ("clipped_softmax1(-0.1:1.2)", {}),
        ("vanilla", {"alpha": 1.0, "train_seq_length": 8}),
    ],
)
@pytest.mark.parametrize("mask", ["padding", "causal"])
def test_gradcheck_in_float64(name, settings, mask):
    allowed = masks()[mask]
    module = build(name, **settings)
    # Away from the kinks (softpick's relu at s = 0, the clip's corners), where the gradient is defined.
    scores = random_scores(5, scale=1.0)
    scores = torch.where(scores.abs() < 0.05, scores + 0.2, scores).requires_grad_(True)
    inputs = (scores,)
    if isinstance(module, LearnedSink):
        logits = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
        inputs = (scores, logits)

        def function(s, b):
            return softmax_with_sink(masked(s, allowed), b.view(-1, 1, 1)).double()
    else:

        def function(s):
            return module(masked(s, allowed), allowed)

    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5)
