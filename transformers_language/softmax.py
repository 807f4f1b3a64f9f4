"""Softmax variants of the attention block, in a registry keyed by idea.

Clipped softmax (Bondarenko et al. 2023): clip((zeta - gamma) * softmax(s) + gamma, 0, 1). With gamma < 0 a
head can give exact zeros (attend to nothing) without pushing its scores to extremes; clipped entries pass
no gradient. Softmax is computed in float32 and cast back, so half-precision training stays stable.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn

from .errors import UsageError

# Each variant reads its own spelling of --attn_softmax: `parse(text)` gives (gamma, zeta), or None when the
# text is not this variant's; `form` is how users write it.
SOFTMAX_VARIANTS: dict[str, type[nn.Module]] = {}


def register_softmax(name: str):
    def decorator(cls):
        SOFTMAX_VARIANTS[name] = cls
        return cls

    return decorator


def clipped_softmax(scores: torch.Tensor, gamma: float, zeta: float, dim: int = -1) -> torch.Tensor:
    """clip((zeta - gamma) * softmax(scores) + gamma, 0, 1); rows are not renormalised."""
    return _ClippedSoftmax.apply(scores, gamma, zeta, dim)


class _ClippedSoftmax(torch.autograd.Function):
    """Softmax, affine map and clip as one autograd node.

    Autograd's softmax -> mul -> add -> clamp chain allocates and keeps extra (B, H, T, S) tensors and is ~3x
    slower on CPU; here the affine map and clip run in place and the backward is one masked softmax backward.
    The gradient mask is 0 < y < 1: entries clipped to exactly 0 or 1 pass no gradient (entries that reach
    0 or 1 unclipped are p = 0 or one-hot rows, where the softmax gradient is zero anyway).
    """

    @staticmethod
    def forward(ctx, scores, gamma: float, zeta: float, dim: int):
        probs = torch.softmax(scores, dim=dim, dtype=torch.float32)
        clipped = probs.mul(zeta - gamma).add_(gamma).clamp_(0.0, 1.0)
        ctx.save_for_backward(probs, clipped)
        ctx.scale, ctx.dim, ctx.input_dtype = zeta - gamma, dim, scores.dtype
        return clipped.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        probs, clipped = ctx.saved_tensors
        inside = (clipped > 0) & (clipped < 1)
        grad_probs = torch.where(inside, grad_output.float(), 0.0)
        # The fused kernel computes probs * (g - sum(g * probs)), the softmax backward.
        grad_scores = torch._softmax_backward_data(grad_probs, probs, ctx.dim, torch.float32).mul_(ctx.scale)
        return grad_scores.to(ctx.input_dtype), None, None, None


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_CLIPPED = re.compile(rf"^clipped\(\s*({_NUMBER})\s*:\s*({_NUMBER})\s*\)$")


@register_softmax("vanilla")
class Softmax(nn.Module):
    form = "'vanilla'"

    @staticmethod
    def parse(text: str) -> tuple[float, float] | None:
        return (0.0, 1.0) if text == "vanilla" else None

    def __init__(self, config):
        super().__init__()

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


@register_softmax("clipped")
class ClippedSoftmax(nn.Module):
    form = "'clipped(GAMMA:ZETA)' with GAMMA <= 0 <= 1 <= ZETA, e.g. 'clipped(-.025:1)'"

    @staticmethod
    def parse(text: str) -> tuple[float, float] | None:
        match = _CLIPPED.match(text)
        if match is None:
            return None
        gamma, zeta = float(match.group(1)), float(match.group(2))
        if not gamma <= 0.0:
            raise UsageError(f"Clipped softmax needs gamma <= 0, got gamma={gamma} in {text!r}.")
        if not zeta >= 1.0:
            raise UsageError(f"Clipped softmax needs zeta >= 1, got zeta={zeta} in {text!r}.")
        return gamma, zeta

    def __init__(self, config):
        super().__init__()
        self.gamma = config.gamma
        self.zeta = config.zeta

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return clipped_softmax(scores, self.gamma, self.zeta)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, zeta={self.zeta}"


SOFTMAX_FORMS = " or ".join(cls.form for cls in SOFTMAX_VARIANTS.values())


@functools.lru_cache(maxsize=64)  # AttentionConfig.clipped asks on every attention forward
def softmax_variant(method: str) -> tuple[str, tuple[float, float]]:
    """The registered variant whose spelling `method` is, with its (gamma, zeta)."""
    text = method.strip()
    for name, cls in SOFTMAX_VARIANTS.items():
        if (params := cls.parse(text)) is not None:
            return name, params
    raise UsageError(f"Unknown softmax method {method!r}; accepted forms: {SOFTMAX_FORMS}.")


def build_softmax(config) -> nn.Module:
    """The softmax module of an `AttentionConfig` (not imported here: attention_config.py imports this
    registry)."""
    return SOFTMAX_VARIANTS[config.softmax_variant](config)
