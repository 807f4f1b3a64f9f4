"""Clipped softmax against its formula: exact zeros and ones, no gradient through clipped entries."""

import pytest
import torch

from transformers_language import AttentionConfig
from transformers_language.softmax import ClippedSoftmax, Softmax, build_softmax, clipped_softmax


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
    assert Softmax(AttentionConfig())(scores).dtype == torch.bfloat16


def test_registry_builds_by_idea():
    assert type(build_softmax(AttentionConfig())) is Softmax
    module = build_softmax(AttentionConfig(alpha=4, train_seq_length=128))
    assert isinstance(module, ClippedSoftmax) and module.gamma == pytest.approx(-4 / 128) and module.zeta == 1.0
