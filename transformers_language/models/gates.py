"""Gated attention: sigmoid(G(x)) multiplies each head's context before the output projection.

The paper's gates (one value per head and token, or per head) and the output gates of Qiu et al. (NeurIPS
2025, "G1"): headwise, Linear(d_model -> H), and elementwise, Linear(d_model -> H * d_head), one value per
channel, both on the attention input and with PyTorch's default init (no init_prob bias).

Gate networks are registered by idea. Per-head networks hold all heads' weights in one (H, in, out)
tensor and run as a single batched contraction; head h sees only the h-th d_head slice of x.

Initialisation (deliberate; the model's `initialize_weights` calls `reset_parameters`, which uses HF's
guarded init functions, so weights loaded from a checkpoint are never overwritten):
- from scratch: weights and hidden biases as PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (what the paper's models were trained with); the last bias is logit(init_prob).
- fine-tuning: every weight N(0, 0.01), hidden biases 0, last bias logit(init_prob); the gate output is
  scaled by 1 / init_prob, so the model starts close to the pretrained one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from quantization.transforms import fold_into_weights

FINE_TUNING_WEIGHT_STD = 0.01


def logit(prob: float) -> float:
    return math.log(prob) - math.log1p(-prob)


@dataclass(frozen=True)
class GateType:
    """What a gate computes from: one learned logit per head, or a network of the block input (`conditional`),
    per token or averaged over the sequence (`pooled`); `network` fixes the network (else the gate-network
    flags choose it); `init_from_prob`: the last bias starts at logit(init_prob) (the paper's init)."""

    conditional: bool
    pooled: bool = False
    network: str | None = None
    init_from_prob: bool = True

    @property
    def chooses_network(self) -> bool:
        return self.conditional and self.network is None

    def describe(self) -> str:
        return f"its own network ({self.network})" if self.network else "no network (one logit per head)"


# The gate types users name with --attn_gate_type ('none': no gate).
GATE_TYPES: dict[str, GateType | None] = {
    "none": None,
    "unconditional_per_head": GateType(conditional=False),
    "conditional_per_head": GateType(conditional=True, pooled=True),
    "conditional_per_token": GateType(conditional=True),
    "headwise": GateType(conditional=True, network="all_heads_linear", init_from_prob=False),
    "elementwise": GateType(conditional=True, network="elementwise", init_from_prob=False),
}


class HeadwiseLinear(nn.Module):
    """H independent Linear(in_features -> out_features) maps, one per head: (..., H, in) -> (..., H, out)."""

    def __init__(self, num_heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_heads, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hi,hio->...ho", x, self.weight) + self.bias

    def extra_repr(self) -> str:
        heads, fan_in, fan_out = self.weight.shape
        return f"num_heads={heads}, in_features={fan_in}, out_features={fan_out}"


GATE_NETWORKS: dict[str, type[nn.Module]] = {}


def register_gate_network(name: str, flag: str | None = None, help: str = ""):
    """Register a gate network under `name`; `flag` (with `help`) is the paper's switch that selects it (the
    default network, 'linear', has none)."""

    def decorator(cls):
        GATE_NETWORKS[name] = cls
        cls.flag, cls.flag_help = flag, help
        return cls

    return decorator


class _HeadwiseMLP(nn.Module):
    """Per-head network d_head -> [hidden -> ReLU ->] 1, giving gate logits (B, T, H, 1)."""

    def __init__(self, num_heads: int, head_dim: int, hidden: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.hidden = None if hidden is None else HeadwiseLinear(num_heads, head_dim, hidden)
        self.out = HeadwiseLinear(num_heads, hidden or head_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unflatten(-1, (self.num_heads, -1))  # (B, T, H, d_head)
        if self.hidden is not None:
            h = torch.relu(self.hidden(h))
        return self.out(h)

    def layers(self) -> list[nn.Module]:
        return [m for m in (self.hidden, self.out) if m is not None]


@register_gate_network("linear")
class LinearGate(_HeadwiseMLP):
    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim, hidden=None)


@register_gate_network("mlp", "--attn_gate_mlp", "Gate network d_head -> d_head/4 -> 1.")
class MLPGate(_HeadwiseMLP):
    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim, hidden=max(head_dim // 4, 1))


@register_gate_network("mlp2", "--attn_gate_mlp2", "Gate network d_head -> d_head -> 1.")
class MLP2Gate(_HeadwiseMLP):
    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim, hidden=head_dim)


@register_gate_network(
    "all_heads_linear",
    "--attn_gate_linear_all_features",
    "One Linear(d_model -> H) gate on the whole attention input ('all-heads linear').",
)
class AllHeadsLinearGate(nn.Module):
    """One Linear(d_model -> H * per_head) on the whole attention input: logits (B, T, H, per_head)."""

    def __init__(self, num_heads: int, head_dim: int, per_head: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.proj = nn.Linear(num_heads * head_dim, num_heads * per_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).unflatten(-1, (self.num_heads, -1))

    def layers(self) -> list[nn.Module]:
        return [self.proj]


@register_gate_network("elementwise")
class ElementwiseGate(AllHeadsLinearGate):
    """Linear(d_model -> H * d_head): one gate per context channel (the elementwise output gate)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__(num_heads, head_dim, per_head=head_dim)


class AttentionGate(nn.Module):
    """Computes the gate (probabilities times `scale`) that multiplies the context (B, H, T, d_head). Built from
    an `AttentionConfig` (attention_config.py validates its names against this module's registries, so this
    module does not import it)."""

    def __init__(self, config, num_heads: int, head_dim: int, is_causal: bool):
        super().__init__()
        self.gate_type = config.gate_type
        self.kind = GATE_TYPES[config.gate_type]
        self.init_prob = config.init_prob
        self.fine_tuning = config.fine_tuning
        self.scale = config.gate_scale
        self.is_causal = is_causal
        if self.kind.conditional:
            self.network = GATE_NETWORKS[self.kind.network or config.gate_network](num_heads, head_dim)
        else:
            self.logits = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @property
    def needs_input(self) -> bool:
        return self.kind.conditional

    @torch.no_grad()
    def reset_parameters(self):
        bias = logit(self.init_prob)
        if not self.kind.conditional:
            init.constant_(self.logits, bias)
            return
        layers = self.network.layers()
        for layer in layers:
            fan_in = layer.weight.shape[-2] if isinstance(layer, HeadwiseLinear) else layer.weight.shape[1]
            if self.fine_tuning:
                init.normal_(layer.weight, 0.0, FINE_TUNING_WEIGHT_STD)
                init.zeros_(layer.bias)
            else:
                bound = 1.0 / math.sqrt(fan_in)
                init.uniform_(layer.weight, -bound, bound)
                init.uniform_(layer.bias, -bound, bound)
        if self.kind.init_from_prob:
            init.constant_(layers[-1].bias, bias)

    def forward(self, x: torch.Tensor | None, attention_mask: torch.Tensor | None, kv_length: int) -> torch.Tensor:
        """Gate of shape (1 or B, H, 1 or T, 1 or d_head), broadcastable against the context (B, H, T, d_head).

        x: the attention block's input (B, T, d_model); attention_mask: the boolean (B, 1, T, S) mask of the
        attention function (True = attend) or None; kv_length: S, the number of keys.
        """
        if not self.kind.conditional:
            return torch.sigmoid(self.logits).view(1, -1, 1, 1) * self.scale
        logits = self.network(x).transpose(1, 2)  # (B, H, T, 1 or d_head)
        if self.kind.pooled:
            if kv_length != logits.shape[2]:
                raise ValueError(
                    "conditional_per_head gates average over the whole sequence and cannot run with a KV cache; "
                    "pass use_cache=False."
                )
            logits = self._pool(logits, attention_mask)
        return torch.sigmoid(logits) * self.scale

    @torch.no_grad()
    def fold_input_affine(self, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        """Read x~ = (x - shift) / scale instead of the block input x (an equivalent transform of it, which
        quantization/transforms.py describes): the network's first layer absorbs scale and shift per channel."""
        if not self.kind.conditional:
            return
        first = self.network.layers()[0]
        if not isinstance(first, HeadwiseLinear):
            fold_into_weights(first.weight, first.bias, scale, shift)
            return
        heads = first.weight.shape[0]  # head h reads channels h * d_head ... (h + 1) * d_head - 1
        scales = scale.reshape(heads, -1)
        shifts = None if shift is None else shift.reshape(heads, -1)
        for head in range(heads):
            head_shift = None if shifts is None else shifts[head]
            fold_into_weights(first.weight[head].T, first.bias[head], scales[head], head_shift)

    def _pool(self, logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of the token logits over the tokens each query may attend to (one value per sequence and
        head when nothing is masked): padding is excluded, and a causal model never sees future tokens."""
        num_tokens = logits.shape[2]
        if attention_mask is not None:
            weights = attention_mask.to(logits.dtype)  # (B, 1, T, S)
            return (weights @ logits) / weights.sum(-1, keepdim=True).clamp_min(1.0)
        if self.is_causal:
            counts = torch.arange(1, num_tokens + 1, device=logits.device, dtype=logits.dtype)
            return logits.cumsum(dim=2) / counts.view(1, 1, -1, 1)
        return logits.mean(dim=2, keepdim=True)

    def extra_repr(self) -> str:
        return f"gate_type={self.gate_type}, init_prob={self.init_prob}, scale={self.scale}"
