"""The later no-op mechanisms inside whole models: each attention layer against a hand computation, softmax1 as
a zero learned key, a sink at -inf as vanilla, the fused and explicit paths, and the output gates."""

import math

import pytest
import torch

from transformers_language import AttentionConfig, build_model
from transformers_language.models.attention_config import logit

from .conftest import batch, tiny_config

HEADS, HIDDEN = 4, 32
HEAD_DIM = HIDDEN // HEADS


def make(model_type, seed=0, **attention):
    torch.manual_seed(seed)
    return build_model(tiny_config(model_type), AttentionConfig(**attention)).eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def captured_contexts(model, ids, mask) -> list[torch.Tensor]:
    """Each layer's attention context (B, T, H * d) before the output projection."""
    contexts = []
    handles = [
        v.context.register_forward_hook(lambda m, a, out: contexts.append(out.detach()))
        for v in model.attention_variants().values()
    ]
    logits(model, ids, mask)
    for handle in handles:
        handle.remove()
    return contexts


def first_layer_by_hand(model, ids, mask, weights_of, extra_kv=None) -> torch.Tensor:
    """Layer 0's attention context computed from its projections with plain tensor ops: `weights_of(scores,
    allowed)` turns the masked (B, H, T, S) scores into weights; `extra_kv` (key, value) of shape (H, 1, d) is
    prepended."""
    with torch.no_grad():
        if model.config.model_type == "bert":
            hidden = model.bert.embeddings(input_ids=ids)
            attention = model.bert.encoder.layer[0].attention.self
            project = (attention.query, attention.key, attention.value)
            scaling = HEAD_DIM**-0.5
            allowed = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        else:
            hidden = model.model.decoder.embed_tokens(ids) + model.model.decoder.embed_positions(mask, 0)
            layer = model.model.decoder.layers[0]
            hidden = layer.self_attn_layer_norm(hidden)
            attention = layer.self_attn
            project = (attention.q_proj, attention.k_proj, attention.v_proj)
            scaling = attention.scaling
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
            allowed = causal & mask.bool()[:, None, None, :]
        query, key, value = (p(hidden).unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for p in project)
        if extra_kv is not None:
            extra_key, extra_value = (t.expand(ids.shape[0], -1, -1, -1) for t in extra_kv)
            key, value = torch.cat([extra_key, key], 2), torch.cat([extra_value, value], 2)
            allowed = torch.nn.functional.pad(allowed, (1, 0), value=True)
        scores = (query * scaling) @ key.transpose(-1, -2)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return (weights_of(scores, allowed) @ value).transpose(1, 2).flatten(2)


def softpick_formula(scores, allowed, eps=1e-6):
    e = (torch.exp(scores.double()) - 1).masked_fill(~allowed, 0.0)
    return (torch.relu(e) / (e.abs().sum(-1, keepdim=True) + eps)).float()


HAND = {
    "vanilla": lambda s, a: torch.softmax(s, -1),
    "softmax1": lambda s, a: torch.softmax(torch.nn.functional.pad(s, (0, 1)), -1)[..., :-1],
    "softpick": softpick_formula,
    "sigmoid": lambda s, a: torch.sigmoid(s - math.log(16)),
}


@pytest.mark.parametrize("model_type", ["bert", "opt"])
@pytest.mark.parametrize("normaliser", sorted(HAND))
def test_each_normaliser_equals_a_hand_computation_in_the_model(model_type, normaliser):
    model = make(model_type, softmax=normaliser, train_seq_length=16 if normaliser == "sigmoid" else None)
    ids, mask = batch(model_type)
    ours = captured_contexts(model, ids, mask)[0]
    expected = first_layer_by_hand(model, ids, mask, HAND[normaliser])
    valid = mask.bool()  # the outputs of padded query positions are not used
    torch.testing.assert_close(ours[valid], expected[valid], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_the_learned_key_and_value_equal_a_hand_computation_on_both_paths(model_type):
    model = make(model_type, bias_kv=True)
    variant = next(iter(model.attention_variants().values()))
    ids, mask = batch(model_type)
    extra = (variant.bias_kv.key.detach(), variant.bias_kv.value.detach())
    expected = first_layer_by_hand(model, ids, mask, HAND["vanilla"], extra_kv=extra)
    valid = mask.bool()
    assert variant.uses_fused_path()
    fused = captured_contexts(model, ids, mask)[0]
    torch.testing.assert_close(fused[valid], expected[valid], rtol=1e-5, atol=1e-6)
    hook = variant.probs.register_forward_hook(lambda *a: None)
    assert not variant.uses_fused_path()
    explicit = captured_contexts(model, ids, mask)[0]
    hook.remove()
    torch.testing.assert_close(explicit[valid], expected[valid], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model_type", "left_padding"), [("bert", False), ("opt", False), ("opt", True)])
def test_softmax1_is_a_learned_key_fixed_at_zero(model_type, left_padding):
    """softmax1 = softmax with one more key of logit 0 and value 0: a zero learned key gives logit q . 0 = 0."""
    softmax1, zero_key = make(model_type, softmax="softmax1"), make(model_type, bias_kv=True)
    state = softmax1.state_dict()
    for name in zero_key.attention_variants():
        state[f"{name}.bias_kv.key"] = torch.zeros(HEADS, 1, HEAD_DIM)
        state[f"{name}.bias_kv.value"] = torch.zeros(HEADS, 1, HEAD_DIM)
    zero_key.load_state_dict(state, strict=True)
    ids, mask = batch(model_type, left_padding=left_padding)
    valid = mask.bool()
    ours, reference = captured_contexts(softmax1, ids, mask), captured_contexts(zero_key, ids, mask)
    for layer in range(2):
        torch.testing.assert_close(ours[layer][valid], reference[layer][valid], rtol=1e-5, atol=1e-6)
    vanilla = captured_contexts(make(model_type), ids, mask)[0]
    assert (vanilla[valid] - ours[0][valid]).abs().max() > 1e-3  # the extra key does take weight


def test_a_sink_at_minus_infinity_is_vanilla(model_type):
    vanilla, sink = make(model_type), make(model_type, softmax="sink")
    state = vanilla.state_dict()
    for name in sink.attention_variants():
        state[f"{name}.softmax.sink_logit"] = torch.full((HEADS,), -math.inf)
    sink.load_state_dict(state, strict=True)
    ids, mask = batch(model_type)
    torch.testing.assert_close(logits(sink, ids, mask), logits(vanilla, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_type", ["headwise", "elementwise"])
@pytest.mark.parametrize("probability", [0.2, 0.7])
def test_output_gates_with_zero_weights_scale_every_head_by_their_bias(model_type, gate_type, probability):
    vanilla, gated = make(model_type), make(model_type, gate_type=gate_type)
    state = vanilla.state_dict()
    for name, variant in gated.attention_variants().items():
        proj = variant.gate.network.proj
        expected_out = HEADS if gate_type == "headwise" else HIDDEN
        assert proj.weight.shape == (expected_out, HIDDEN)  # d_model -> H, or -> H * d_head
        state[f"{name}.gate.network.proj.weight"] = torch.zeros_like(proj.weight)
        state[f"{name}.gate.network.proj.bias"] = torch.full_like(proj.bias, logit(probability))
    gated.load_state_dict(state, strict=True)
    ids, mask = batch(model_type)
    # Layer 0 reads the same input in both models: its context is scaled by exactly the gate probability.
    expected = probability * captured_contexts(vanilla, ids, mask)[0]
    torch.testing.assert_close(captured_contexts(gated, ids, mask)[0], expected, rtol=1e-5, atol=1e-6)


def test_output_gates_start_from_pytorch_default_init_not_init_prob():
    model = make("opt", gate_type="headwise")
    biases = torch.cat([v.gate.network.proj.bias for v in model.attention_variants().values()])
    bound = 1 / math.sqrt(HIDDEN)
    assert (biases.abs() <= bound).all() and biases.std() > 0  # U(-1/sqrt(d), 1/sqrt(d)), no logit(init_prob)


@pytest.mark.parametrize(
    "attention",
    [
        {"bias_kv": True},
        {"gate_type": "headwise"},
        {"gate_type": "elementwise"},
        {"gate_type": "elementwise", "bias_kv": True},
        {"softmax": "softmax1"},
        {"softmax": "sink"},
        {"softmax": "sink", "bias_kv": True, "gate_type": "headwise"},
    ],
)
@pytest.mark.parametrize(("model_type", "left_padding"), [("bert", False), ("opt", False), ("opt", True)])
def test_fused_path_equals_explicit_path_for_the_fused_variants(attention, model_type, left_padding):
    """softmax1 and the learned sink run fused as a null key (a constant query channel carries its logit)."""
    model = make(model_type, **attention)
    for variant in model.attention_variants().values():
        assert variant.uses_fused_path()
        if variant.settings.normaliser == "sink":  # per-head logits away from their init
            variant.softmax.sink_logit.data = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    ids, mask = batch(model_type, left_padding=left_padding)
    valid = mask.bool()
    fused = logits(model, ids, mask)
    for variant in model.attention_variants().values():
        variant.probs.register_forward_hook(lambda *a: None)
        assert not variant.uses_fused_path()
    torch.testing.assert_close(logits(model, ids, mask)[valid], fused[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softmax", ["softpick", "sigmoid", "clipped_softmax1(-0.1:1)", "clipped_sink(-0.1:1)"])
def test_the_normalisers_without_a_fused_form_take_the_explicit_path(softmax):
    model = make("opt", softmax=softmax, train_seq_length=16)
    assert not any(v.uses_fused_path() for v in model.attention_variants().values())


def test_the_fused_sink_passes_the_same_gradient_to_its_logits():
    model = make("opt", softmax="sink")
    ids, mask = batch("opt")
    grads = []
    for explicit in (False, True):
        hooks = [v.probs.register_forward_hook(lambda *a: None) for v in model.attention_variants().values()]
        if not explicit:
            for hook in hooks:
                hook.remove()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(torch.cat([v.softmax.sink_logit.grad for v in model.attention_variants().values()]))
        for hook in hooks:
            hook.remove()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_generation_with_a_cache_matches_the_full_forward_for_the_learned_key():
    model = make("opt", bias_kv=True, softmax="sink")
    ids = torch.randint(3, 90, (1, 10))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :6], use_cache=True)
        step = model(input_ids=ids[:, 6:7], cache=prefix.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, 0], full[:, 6], rtol=1e-5, atol=1e-5)
