"""Uniform affine fake quantization: x_hat = s * (clamp(round(x / s) + z, q_min, q_max) - z).

Asymmetric grids are [0, 2^b - 1] with the range widened to include 0 (so 0 is exactly representable) and
an integer zero point. Symmetric grids are signed [-2^(b-1), 2^(b-1) - 1] with z = 0, or unsigned
[0, 2^b - 1] for a tensor with no negative values. Per-tensor, or per-channel along one axis.

A quantizer has three modes. `off` passes values through. `observe` feeds its range estimator (calibration)
and passes values through, or, with `quantize_while_observing`, fake-quantizes them with the range estimated
so far (calibration as the paper's code ran it: each quantizer sees the quantized outputs of the ones
upstream). `quantize` fake-quantizes with the frozen range. `learn` fake-quantizes with a range being learnt
(`learnable_range`, set by token_clipping.learn_ranges), differentiable in its ends. The frozen scale and zero point
are buffers, so a calibrated model saves and reloads them with its state. The arithmetic is torch's fused
fake-quantize kernel: round-to-nearest-even, and a straight-through gradient inside the range (zero
outside); without a gradient, the same arithmetic as plain tensor ops (bit-identical, faster on CPU).

This is the static quantizer, per tensor or per channel along `axis` (weights: one range per output row).
Per-embedding-group ranges (groups.py) and per-token dynamic ranges (dynamic.py) are its subclasses.
"""

from __future__ import annotations

import torch

from .affine import check_bits, scale_and_zero_point
from .buffers import CalibratedState
from .estimators import RangeEstimator, build_estimator
from .sums import hidden_from_sums
from .token_mask import real_extremes, real_rows, real_values

MODES = ("off", "observe", "quantize", "learn")


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int, axis: int | None
) -> torch.Tensor:
    """Quantize-dequantize `x` (any float dtype; computed in fp32) with torch's kernels (straight-through
    gradient inside the range, zero outside)."""
    values = x.float()
    if axis is None:
        out = torch.fake_quantize_per_tensor_affine(values, scale.reshape(()), zero_point.reshape(()), q_min, q_max)
    else:
        out = torch.fake_quantize_per_channel_affine(
            values, scale.flatten(), zero_point.flatten(), axis % x.dim(), q_min, q_max
        )
    return out.to(x.dtype)


def fake_quantize_no_grad(
    x: torch.Tensor, scale: torch.Tensor, low: float, high: float, in_place: bool = False
) -> torch.Tensor:
    """Per-tensor quantize-dequantize without a gradient, bit-identical to `fake_quantize` and 3-6x faster on
    CPU: the kernel's arithmetic in its order (round x / s, then clamp) as four tensor ops. `low` / `high` are
    the grid bounds minus the zero point: clamp(round(x / s) + z, q_min, q_max) - z equals clamp(round(x / s),
    q_min - z, q_max - z) exactly (integers in fp32), so the shift costs no pass. Plain float bounds, because
    tensor bounds make clamp 1.5x slower. `in_place` overwrites an fp32 `x` instead of allocating the result."""
    values = x.float()
    values = values.mul_(1.0 / scale) if in_place else values.mul(1.0 / scale)
    return values.round_().clamp_(low, high).mul_(scale).to(x.dtype)


def fake_quantize_broadcast_no_grad(
    x: torch.Tensor, inverse_scale: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Quantize-dequantize without a gradient with scales broadcast against `x` (per channel or per row),
    bit-identical to torch's per-channel kernel: round(x * (1 / s)), clamped to the grid shifted by the zero
    point (`low` / `high`: q_min - z, q_max - z, as in `fake_quantize_no_grad`), times s."""
    return x.float().mul(inverse_scale).round_().clamp_(low, high).mul_(scale).to(x.dtype)


def _along(values: torch.Tensor, axis: int, dim: int) -> torch.Tensor:
    """(C,) per-channel values shaped to broadcast along `axis` of a `dim`-dimensional tensor."""
    return values.reshape(-1, *[1] * (dim - 1 - axis % dim))


def no_grad_grid(scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int, per_tensor: bool) -> tuple:
    """What the no-gradient arithmetic reads of a grid: per tensor, s and the bounds shifted by the zero point as
    floats (clamp with tensor bounds is about 18x slower on a CPU); per channel, 1 / s, s and the shifted bounds
    as (C,) tensors."""
    if per_tensor:
        zero = float(zero_point.reshape(()))
        return scale.reshape(()), q_min - zero, q_max - zero
    zero = zero_point.float()
    return 1.0 / scale, scale, q_min - zero, q_max - zero


class Quantizer(CalibratedState):
    """Fake quantizer of one tensor (weights or activations) with its range estimator."""

    def __init__(
        self,
        n_bits: int = 8,
        symmetric: bool = False,
        estimator: str | RangeEstimator = "current_minmax",
        axis: int | None = None,
        in_place: bool = False,
        **estimator_options,
    ):
        """`in_place`: without a gradient, overwrite the input with its quantized value (no new tensor). Only
        for activation points whose input is a fresh intermediate that nothing else reads; never weights."""
        super().__init__()
        self.n_bits = check_bits(n_bits)
        self.symmetric = symmetric
        self.axis = axis
        self.estimator = (
            build_estimator(estimator, self.n_bits, symmetric, axis, **estimator_options)
            if isinstance(estimator, str)
            else estimator
        )
        self.in_place = in_place
        self.mode = "off"
        self.quantize_while_observing = False
        self.q_range: tuple[int, int] | None = None  # host copy of grid_bounds, read every forward
        self.grid: tuple | None = None  # no_grad_grid of the frozen range
        self.learnable_range = None  # mode `learn`: a callable x -> fake-quantized x with learnt ends
        self.fixed_range = False  # set once its weight was rounded onto the frozen grid (GPTQ): calibration keeps it
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.register_buffer("grid_bounds", torch.empty(0, dtype=torch.int64))

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown quantizer mode {mode!r}; valid modes: {', '.join(MODES)}.")
        if mode == "quantize" and not self.is_frozen:
            raise RuntimeError("This quantizer has no range yet: calibrate (observe, then freeze) first.")
        if mode == "learn" and self.learnable_range is None:
            raise RuntimeError("Set `learnable_range` before learning a range (token_clipping.learn_ranges does).")
        self.mode = mode

    @property
    def is_identity(self) -> bool:
        """True while values pass through unchanged (mode off)."""
        return self.mode == "off"

    @property
    def is_frozen(self) -> bool:
        return self.scale.numel() > 0

    @property
    def needs_calibration(self) -> bool:
        """Whether its range comes from calibration data (a dynamic quantizer's does not)."""
        return True

    def calibrated_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (low, high) that `freeze` fixes: the estimator's, per tensor or per channel."""
        return self.estimator.range()

    @torch.no_grad()
    def freeze(self, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> None:
        """Fix the range from what the estimator has seen (or to `low`, `high`); quantize from now on."""
        if low is None or high is None:
            low, high = self.calibrated_range()
        scale, zero_point, q_min, q_max = scale_and_zero_point(low, high, self.n_bits, self.symmetric)
        self.scale, self.zero_point = scale, zero_point
        self.grid_bounds = torch.tensor([q_min, q_max], device=scale.device)
        self._cache_host_grid()
        self.mode = "quantize"

    def _cache_host_grid(self) -> None:
        """Host copies of the grid, read every forward (one device sync here instead of one per call)."""
        self.q_range = tuple(self.grid_bounds.tolist())
        self.grid = no_grad_grid(self.scale, self.zero_point, *self.q_range, self.axis is None)

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """What the estimator sees of `x`: the values of real tokens (token_mask.py), as rows when it reads rows,
        as each real row's minimum and maximum when only the extremes count."""
        values = x.detach()
        if self.estimator.reads_extremes_only:
            return real_extremes(values)
        return real_rows(values) if self.estimator.reads_rows else real_values(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "learn":
            with hidden_from_sums():
                return self.learnable_range(x)
        if self.mode == "observe":
            with hidden_from_sums():
                self.estimator.observe(self.observed(x))
            if not self.quantize_while_observing:
                return x
            scale, zero_point, q_min, q_max = scale_and_zero_point(*self.estimator.range(), self.n_bits, self.symmetric)
            if torch.is_grad_enabled() and x.requires_grad:
                return fake_quantize(x, scale, zero_point, q_min, q_max, self.axis)
            return self._quantize_no_grad(x, no_grad_grid(scale, zero_point, q_min, q_max, self.axis is None))
        if torch.is_grad_enabled() and x.requires_grad:
            return fake_quantize(x, self.scale, self.zero_point, *self.q_range, self.axis)
        return self._quantize_no_grad(x, self.grid)

    def _quantize_no_grad(self, x: torch.Tensor, grid: tuple) -> torch.Tensor:
        """Fake-quantize `x` on `grid` (no_grad_grid) with the no-gradient arithmetic."""
        if self.axis is None:
            return fake_quantize_no_grad(x, *grid, in_place=self.in_place)
        return fake_quantize_broadcast_no_grad(x, *(_along(t, self.axis, x.dim()) for t in grid))

    def _after_load(self) -> None:
        if self.is_frozen:
            self._cache_host_grid()
            self.mode = "quantize"

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        channel = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.n_bits} bits, {kind}, {channel}, {type(self.estimator).__name__}, mode={self.mode}"
