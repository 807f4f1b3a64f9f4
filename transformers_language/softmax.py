"""Softmax variants of the attention block, in a registry keyed by idea.

Clipped softmax (Bondarenko et al. 2023): clip((zeta - gamma) * softmax(s) + gamma, 0, 1). With gamma < 0 a
head can give exact zeros (attend to nothing) without pushing its scores to extremes; clipped entries pass
no gradient. Softmax is computed in float32 and cast back, so half-precision training stays stable.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_config import AttentionConfig

SOFTMAX_VARIANTS: dict[str, type[nn.Module]] = {}


def register_softmax(name: str):
    def decorator(cls):
        SOFTMAX_VARIANTS[name] = cls
        cls.variant_name = name
        return cls

    return decorator


def clipped_softmax(scores: torch.Tensor, gamma: float, zeta: float, dim: int = -1) -> torch.Tensor:
    """clip((zeta - gamma) * softmax(scores) + gamma, 0, 1); rows are not renormalised."""
    probs = torch.softmax(scores, dim=dim, dtype=torch.float32)
    return ClippedAffine.apply(probs, zeta - gamma, gamma).to(scores.dtype)


class ClippedAffine(torch.autograd.Function):
    """y = clamp(scale * p + shift, 0, 1) in one pass; the gradient is zero where y was clipped.

    Autograd's mul -> add -> clamp chain writes two extra (B, H, T, T) tensors and keeps one for backward;
    this keeps only a boolean mask.
    """

    @staticmethod
    def forward(ctx, probs, scale: float, shift: float):
        affine = probs * scale + shift
        inside = (affine >= 0) & (affine <= 1)
        ctx.save_for_backward(inside)
        ctx.scale = scale
        return affine.clamp_(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        return grad_output * inside * ctx.scale, None, None


@register_softmax("vanilla")
class Softmax(nn.Module):
    def __init__(self, config: AttentionConfig):
        super().__init__()

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


@register_softmax("clipped")
class ClippedSoftmax(nn.Module):
    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.gamma = config.gamma
        self.zeta = config.zeta

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return clipped_softmax(scores, self.gamma, self.zeta)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, zeta={self.zeta}"


def build_softmax(config: AttentionConfig) -> nn.Module:
    return SOFTMAX_VARIANTS["clipped" if config.clipped else "vanilla"](config)
