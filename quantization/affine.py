"""The integer grid of uniform affine quantization, and the scale / zero point of a range on it."""

from __future__ import annotations

import torch

BIT_WIDTHS = range(2, 17)


def check_bits(n_bits: int) -> int:
    if n_bits not in BIT_WIDTHS:
        raise ValueError(
            f"Bit width {n_bits} is out of range; valid bit widths: {BIT_WIDTHS.start}..{BIT_WIDTHS.stop - 1}."
        )
    return n_bits


def grid(n_bits: int, symmetric: bool, signed: bool) -> tuple[int, int]:
    """(q_min, q_max) of the integer grid."""
    if symmetric and signed:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def scale_and_zero_point(
    low: torch.Tensor, high: torch.Tensor, n_bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale, zero point and grid for the range [low, high] (tensors of equal shape: per tensor or channel)."""
    low, high = low.float(), high.float()
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        signed = bool((low < 0).any())
        q_min, q_max = grid(n_bits, True, signed)
        absmax = torch.maximum(high.abs(), low.abs()) if signed else high.clamp_min(0)
        scale = (absmax / q_max).clamp_min(tiny)
        return scale, torch.zeros_like(scale, dtype=torch.int32), q_min, q_max
    q_min, q_max = grid(n_bits, False, False)
    low, high = low.clamp_max(0), high.clamp_min(0)
    scale = ((high - low) / q_max).clamp_min(tiny)
    zero_point = torch.round(-low / scale).clamp(q_min, q_max).to(torch.int32)
    return scale, zero_point, q_min, q_max


def round_straight_through(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity's gradient backward."""
    return x + (x.round() - x).detach()


def learnable_fake_quantize(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, n_bits: int, symmetric: bool
) -> torch.Tensor:
    """Quantize-dequantize `x` on the grid `scale_and_zero_point(low, high)` gives (per tensor), differentiable
    in `low` and `high`: rounding passes the gradient straight through, clamping stops it outside the grid. Its
    values are those of the frozen quantizer of that range (round(x / s) + z, then clamp, minus z, times s)."""
    values = x.float()
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        signed = bool(low.detach() < 0)
        q_min, q_max = grid(n_bits, True, signed)
        absmax = torch.maximum(high.abs(), low.abs()) if signed else high.clamp_min(0)
        scale = (absmax / q_max).clamp_min(tiny)
        return (round_straight_through(values / scale).clamp(q_min, q_max) * scale).to(x.dtype)
    q_min, q_max = grid(n_bits, False, False)
    low, high = low.clamp_max(0), high.clamp_min(0)
    scale = ((high - low) / q_max).clamp_min(tiny)
    zero = round_straight_through(-low / scale).clamp(q_min, q_max)
    quantized = (round_straight_through(values / scale) + zero).clamp(q_min, q_max) - zero
    return (quantized * scale).to(x.dtype)
