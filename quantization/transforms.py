"""Equivalent transforms: per-channel scales and shifts of an activation moved into the modules around it, so a
quantizer sees a narrower tensor while the float model computes the same function.

An activation X (..., d) made by a LayerNorm becomes X~ = (X - shift) / scale. The LayerNorm makes X~ itself
(gamma' = gamma / scale, beta' = (beta - shift) / scale); every Linear that reads X reads X~ instead
(W' = W diag(scale), b' = b + W shift); a shortcut that carried X gets `ChannelAffine` (X~ * scale + shift)
in front of its addition. Three choices of (scale, shift), from the papers in ptq.md:

  gamma migration (Outlier Suppression)  scale = gamma, shift = 0: the LayerNorm no longer scales
  SmoothQuant                            scale_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), shift = 0
  OS+                                    shift_j = (max_j + min_j) / 2, scale_j = max(1, max|X_j - shift_j| / t),
                                         t searched on a grid for the least quantized output error

The arithmetic runs in float64 and is cast back once, so an fp32 model changes by rounding only. This module
knows nothing of model families: which LayerNorm feeds which Linears is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .channel_statistics import ChannelStatistics

SMOOTHQUANT_FLOOR = 1e-5  # SmoothQuant's clamp on the scales (its code's), so no channel is divided by ~0


@torch.no_grad()
def fold_into_norm(norm: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Make `norm` (a LayerNorm, or an RMSNorm: no bias) output (norm(x) - shift) / scale: gamma / scale,
    (beta - shift) / scale."""
    scale64 = scale.double()
    weight, bias = norm.weight, getattr(norm, "bias", None)
    gamma = weight.double() if weight is not None else torch.ones_like(scale64)
    beta = bias.double() if bias is not None else torch.zeros_like(scale64)
    if shift is not None:
        beta = beta - shift.double()
    if weight is None or (bias is None and bool(beta.ne(0).any())):
        raise ValueError("Folding a scale into a norm needs its affine weight (and a bias for a shift).")
    weight.copy_(gamma / scale64)
    if bias is not None:
        bias.copy_(beta / scale64)


@torch.no_grad()
def fold_into_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None = None
) -> None:
    """Let the map x -> x W^T + b read x~ = (x - shift) / scale instead of x: W diag(scale), b + W shift.
    `weight` is (out, in) (a Linear's, or a view of one head's), changed in place like `bias`."""
    original = weight.double()
    if shift is not None and bool(shift.ne(0).any()):
        if bias is None:
            raise ValueError("A shift folds into the bias of the Linear that reads it, and this one has none.")
        bias.copy_(bias.double() + original @ shift.double())
    weight.copy_(original * scale.double())


def fold_into_linear(linear: nn.Linear, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    fold_into_weights(linear.weight, linear.bias, scale, shift)


class ChannelAffine(nn.Module):
    """x * scale + shift per channel: puts back the X a shortcut carried before the transform. Identity until
    a transform (or a saved state) sets the buffers."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    @torch.no_grad()
    def compose(self, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        """After another transform of the same tensor: x~~ * scale + shift is x~, so the total is updated."""
        if shift is not None:
            self.shift.copy_(self.shift.double() + self.scale.double() * shift.double())
        self.scale.copy_(self.scale.double() * scale.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


def gamma_migration_scale(gamma: torch.Tensor) -> torch.Tensor:
    """Gamma itself (a channel with gamma = 0 is a constant and keeps scale 1)."""
    return torch.where(gamma == 0, torch.ones_like(gamma), gamma)


def smoothquant_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), floored at SMOOTHQUANT_FLOOR; 1 where a channel is all
    zero in the activations or in every weight (nothing to balance)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant's alpha lies in [0, 1], got {alpha}.")
    act, weight = act_absmax.double(), weight_absmax.double()
    scale = (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp_min(SMOOTHQUANT_FLOOR)
    return torch.where((act > 0) & (weight > 0), scale, torch.ones_like(scale)).to(act_absmax.dtype)


def input_column_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max over the rows of every (out, in) weight of |W_:,j|: the weight side of SmoothQuant's balance."""
    return torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)


def os_plus_shift(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """OS+'s channel shift: the middle of each channel's range, which makes the range symmetric."""
    return (low + high) / 2


def os_plus_scale(half_range: torch.Tensor, threshold: float) -> torch.Tensor:
    """OS+'s channel scale: max(1, range / t), shrinking only the channels wider than t."""
    return (half_range / threshold).clamp_min(1.0)


def os_plus_search(
    sample: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    weights: Sequence[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]],
    quantize_activation: Callable[[torch.Tensor], torch.Tensor],
    grid: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """OS+ scale and shift of one activation. `sample` is (tokens, d) of the float activation, `low` / `high`
    its per-channel calibration extremes; `weights` the (out, in) weight of each Linear reading it with the
    function that fake-quantizes such a weight; `quantize_activation` calibrates on and fake-quantizes a
    transformed sample. The threshold t is the candidate among max_j(half range) * k / grid (k = 1..grid; the
    last scales nothing) with the least sum over the Linears of ||Q(X~) Q(W')^T - X~ W'^T||^2: the error
    quantization adds to the output of the Linears the transform feeds. Returns (scale, shift, record)."""
    shift = os_plus_shift(low, high)
    half_range = (high - low) / 2
    widest = float(half_range.max())
    centered = sample.float() - shift
    errors = []
    best = None
    for k in range(1, grid + 1):
        threshold = widest * k / grid if widest > 0 else 1.0
        scale = os_plus_scale(half_range, threshold)
        transformed = centered / scale
        quantized = quantize_activation(transformed)
        error = 0.0
        for weight, quantize_weight in weights:
            scaled = weight.detach().float() * scale
            error += float((quantized @ quantize_weight(scaled).T - transformed @ scaled.T).square().sum())
        errors.append([threshold, error])
        if best is None or error < best[0]:
            best = (error, threshold, scale)
    _, threshold, scale = best
    record = {"threshold": threshold, "scaled_channels": int((scale > 1).sum()), "errors": errors}
    return scale, shift, record


@dataclass
class TransformSite:
    """One LayerNorm output and what reads it, as a transform sees them."""

    name: str
    gamma: torch.Tensor
    weights: list[torch.Tensor]
    """(out, in) weights of the Linears reading the output (gates excluded: they stay in floating point)."""
    statistics: ChannelStatistics | None = None
    """The float activation's channel statistics over the calibration batches (for transforms that need them)."""
    quantize_activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Calibrate on and fake-quantize a sample of the (transformed) activation, as its quantization point will."""
    quantize_weights: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    """Fake-quantize each reader's (transformed) weight, as its weight point will."""


@dataclass(frozen=True)
class Transform:
    """An equivalent transform: whether it needs calibration statistics, and its (scale, shift, record) at a
    site given the settings (an object with `smoothquant_alpha` and `os_plus_grid`)."""

    needs_statistics: bool
    compute: Callable[[TransformSite, object], tuple[torch.Tensor, torch.Tensor | None, dict]]


def _gamma_migration(site: TransformSite, settings) -> tuple:
    return gamma_migration_scale(site.gamma.detach()), None, {}


def _smoothquant(site: TransformSite, settings) -> tuple:
    scale = smoothquant_scale(site.statistics.absmax, input_column_absmax(site.weights), settings.smoothquant_alpha)
    return scale, None, {"max_scale": float(scale.max()), "min_scale": float(scale.min())}


def _os_plus(site: TransformSite, settings) -> tuple:
    stats = site.statistics
    pairs = list(zip(site.weights, site.quantize_weights, strict=True))
    return os_plus_search(stats.sample, stats.low, stats.high, pairs, site.quantize_activation, settings.os_plus_grid)


# The equivalent transforms by name, in the order they apply when combined.
TRANSFORMS: dict[str, Transform] = {
    "gamma_migration": Transform(needs_statistics=False, compute=_gamma_migration),
    "smoothquant": Transform(needs_statistics=True, compute=_smoothquant),
    "os_plus": Transform(needs_statistics=True, compute=_os_plus),
}
