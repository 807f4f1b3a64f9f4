"""Gate networks: init, shapes per gate type, batched heads equal a per-head loop, padding-aware pooling."""

import pytest
import torch
from torch import nn

from transformers_language import AttentionConfig
from transformers_language.models.gates import AttentionGate

HEADS, HEAD_DIM = 4, 8


def gate(**values):
    return AttentionGate(AttentionConfig(**values), HEADS, HEAD_DIM, is_causal=False)


@pytest.mark.parametrize(
    ("gate_type", "shape"),
    [
        ("unconditional_per_head", (1, HEADS, 1, 1)),
        ("conditional_per_head", (3, HEADS, 1, 1)),
        ("conditional_per_token", (3, HEADS, 5, 1)),
    ],
)
def test_gate_shapes(gate_type, shape):
    x = torch.randn(3, 5, HEADS * HEAD_DIM)
    probs = gate(gate_type=gate_type)(x, None, kv_length=5)
    assert probs.shape == shape and ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("init_prob", [0.25, 0.5, 0.9])
def test_linear_gate_mean_at_init_is_init_prob(init_prob):
    torch.manual_seed(0)
    module = AttentionGate(AttentionConfig(gate_type="conditional_per_token", init_prob=init_prob), 12, 64, False)
    x = torch.randn(8, 128, 768) * 0.3  # LayerNorm-scale inputs; logits spread ~0.3 around logit(init_prob)
    assert module(x, None, kv_length=128).mean().item() == pytest.approx(init_prob, abs=0.02)
    bias = torch.log(torch.tensor(init_prob / (1 - init_prob)))
    torch.testing.assert_close(module.network.out.bias, torch.full((12, 1), bias.item()))


def test_unconditional_gate_starts_at_init_prob():
    probs = gate(gate_type="unconditional_per_head", init_prob=0.25)(None, None, kv_length=5)
    torch.testing.assert_close(probs, torch.full((1, HEADS, 1, 1), 0.25))


def reference_logits(module: AttentionGate, x: torch.Tensor) -> torch.Tensor:
    """Per-head loop with one nn.Sequential per head built from the batched weights (the paper's layout)."""
    network = module.network
    layers = [layer for layer in (network.hidden, network.out) if layer is not None]
    heads = x.unflatten(-1, (HEADS, HEAD_DIM))
    logits = []
    for h in range(HEADS):
        stack = []
        for i, layer in enumerate(layers):
            linear = nn.Linear(*layer.weight.shape[1:])
            linear.weight.data = layer.weight[h].T.clone()
            linear.bias.data = layer.bias[h].clone()
            stack += [linear] + ([nn.ReLU()] if i < len(layers) - 1 else [])
        logits.append(nn.Sequential(*stack)(heads[:, :, h]))  # (B, T, 1)
    return torch.stack(logits, dim=1)  # (B, H, T, 1)


@pytest.mark.parametrize("network", ["linear", "mlp", "mlp2"])
@pytest.mark.parametrize("gate_type", ["conditional_per_token", "conditional_per_head"])
def test_batched_heads_equal_per_head_loop(network, gate_type):
    torch.manual_seed(1)
    module = gate(gate_type=gate_type, gate_network=network)
    x = torch.randn(2, 6, HEADS * HEAD_DIM)
    logits = reference_logits(module, x)
    if gate_type == "conditional_per_head":
        logits = logits.mean(dim=2, keepdim=True)
    torch.testing.assert_close(module(x, None, kv_length=6), torch.sigmoid(logits))


def test_mlp_sizes_and_all_heads_linear():
    assert gate(gate_type="conditional_per_token", gate_network="mlp").network.hidden.weight.shape == (4, 8, 2)
    assert gate(gate_type="conditional_per_token", gate_network="mlp2").network.hidden.weight.shape == (4, 8, 8)
    module = gate(gate_type="conditional_per_token", gate_network="all_heads_linear")
    x = torch.randn(2, 6, HEADS * HEAD_DIM)
    expected = torch.sigmoid(module.network.proj(x)).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(module(x, None, kv_length=6), expected)


def test_fine_tuning_init_and_scale():
    torch.manual_seed(2)
    module = AttentionGate(
        AttentionConfig(gate_type="conditional_per_token", init_prob=0.25, fine_tuning=True), 12, 64, False
    )
    assert module.scale == 4.0
    assert module.network.out.weight.std().item() == pytest.approx(0.01, rel=0.15)
    # Near-zero weights: every gate starts close to sigmoid(logit(0.25)) * 4 = 1 (logit spread ~0.024,
    # so the gate spread is ~4 * 0.1875 * 0.024 = 0.018).
    probs = module(torch.randn(2, 16, 768) * 0.3, None, kv_length=16)
    assert probs.mean().item() == pytest.approx(1.0, abs=0.01)
    torch.testing.assert_close(probs, torch.ones_like(probs), atol=0.1, rtol=0)


def test_conditional_per_head_pools_over_attended_tokens_only():
    torch.manual_seed(3)
    module = gate(gate_type="conditional_per_head")
    x = torch.randn(2, 6, HEADS * HEAD_DIM)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = keep[:, None, None, :].expand(2, 1, 6, 6)
    token_logits = reference_logits(module, x)
    probs = module(x, mask, kv_length=6)
    torch.testing.assert_close(probs[1, :, 0], torch.sigmoid(token_logits[1, :, :3].mean(1)))
    torch.testing.assert_close(probs[0, :, 0], torch.sigmoid(token_logits[0].mean(1)))
    # A causal gate at token t averages over tokens <= t.
    causal = AttentionGate(AttentionConfig(gate_type="conditional_per_head"), HEADS, HEAD_DIM, is_causal=True)
    causal.load_state_dict(module.state_dict())
    probs = causal(x, None, kv_length=6)
    for t in range(6):
        torch.testing.assert_close(probs[:, :, t], torch.sigmoid(token_logits[:, :, : t + 1].mean(2)))
    with pytest.raises(ValueError, match="use_cache=False"):
        causal(x[:, -1:], None, kv_length=6)
