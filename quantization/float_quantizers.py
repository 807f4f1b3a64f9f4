"""Quantizers on floating-point grids: FP8 (E4M3 / E5M2) with a calibrated scale per tensor or per channel,
and block-scaled formats (MXFP4 / MXFP6 / MXFP8, NVFP4) whose scales come from each block at run time.

Both are `Quantizer`s, selectable per point like the integer grids (config.py builds them from
`--weight_format` / `--act_format`), calibrated, saved and switched the same way. The float quantizer maps the
calibrated absolute maximum onto the format's largest value, s = amax / max, and quantizes x -> cast(x / s) * s
with saturation (formats.py); its range estimators are the min-max ones (a search estimator scores the integer
grid). The block quantizer needs no calibration, like the per-token one. With a gradient, both pass it straight
through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import BLOCK_FORMATS, FLOAT_FORMATS, BlockFormat, FloatFormat, block_quantize, round_to_format
from .quantizer import Quantizer, _along
from .sums import hidden_from_sums
from .token_mask import real_values


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        with hidden_from_sums():  # the quantizer's own addition, never a model's residual sum
            return x + (quantized - x).detach()
    return quantized


def _absmax_scale(low: torch.Tensor, high: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    absmax = torch.maximum(low.float().abs(), high.float().abs())
    return (absmax / fmt.max_value).clamp_min(torch.finfo(torch.float32).tiny)


class FloatQuantizer(Quantizer):
    """Fake quantizer on the grid of the float format `fmt` ('e4m3', 'e5m2', ...) scaled by s = amax / max."""

    def __init__(self, fmt: str, estimator: str = "current_minmax", axis: int | None = None, **estimator_options):
        self.format = FLOAT_FORMATS[fmt]
        self.format_name = f"fp{self.format.bits}_{fmt}"  # as --weight_format / --act_format name it
        super().__init__(self.format.bits, True, estimator, axis, **estimator_options)

    @torch.no_grad()
    def freeze(self, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> None:
        if low is None or high is None:
            low, high = self.calibrated_range()
        self.scale = _absmax_scale(low, high, self.format)
        self.mode = "quantize"

    def _cache_host_grid(self) -> None:
        """Nothing to cache: the grid is the format's."""

    def quantize_with(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale = scale.reshape(()) if self.axis is None else _along(scale, self.axis, x.dim())
        return _straight_through(x, (round_to_format(x.float() / scale, self.format) * scale).to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            with hidden_from_sums():
                self.estimator.observe(self.observed(x))
            if not self.quantize_while_observing:
                return x
            return self.quantize_with(x, _absmax_scale(*self.estimator.range(), self.format))
        if self.mode == "learn":
            raise RuntimeError("A floating-point quantizer has no learnable range.")
        return self.quantize_with(x, self.scale)

    def extra_repr(self) -> str:
        channel = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.format_name}, {channel}, {type(self.estimator).__name__}, mode={self.mode}"


class BlockQuantizer(Quantizer):
    """Block-scaled fake quantizer (`fmt` a BLOCK_FORMATS name), blocks along the last dimension; no calibration."""

    def __init__(self, fmt: str):
        self.format_name = fmt
        self.format: BlockFormat = BLOCK_FORMATS[fmt]
        super().__init__(self.format.bits, True, "current_minmax")

    @property
    def is_frozen(self) -> bool:
        return True

    @property
    def needs_calibration(self) -> bool:
        return False

    def freeze(self, low=None, high=None) -> None:
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off" or (self.mode == "observe" and not self.quantize_while_observing):
            return x
        tensor_amax = None
        if self.format.scale == "e4m3":  # NVFP4's tensor scale: from real tokens only (padding sets no range)
            tensor_amax = real_values(x.detach()).abs().amax()
        return _straight_through(x, block_quantize(x.detach(), self.format, tensor_amax))

    def extra_repr(self) -> str:
        return f"{self.format_name}, blocks of {self.format.block_size}, mode={self.mode}"


@dataclass(frozen=True)
class NumberFormat:
    """A number format a point may take instead of the integer grid: a scaled float format, or a block format."""

    float_format: str | None = None
    block_format: str | None = None

    @property
    def bits(self) -> int:
        return FLOAT_FORMATS[self.float_format].bits if self.float_format else BLOCK_FORMATS[self.block_format].bits

    def quantizer(self, estimator: str, axis: int | None = None, **estimator_options) -> Quantizer:
        if self.block_format is not None:
            return BlockQuantizer(self.block_format)
        return FloatQuantizer(self.float_format, estimator, axis, **estimator_options)


INTEGER = "int"
# The formats of --weight_format / --act_format besides the integer grid of --n_bits (INTEGER).
NUMBER_FORMATS = {
    "fp8_e4m3": NumberFormat(float_format="e4m3"),
    "fp8_e5m2": NumberFormat(float_format="e5m2"),
    "mxfp8": NumberFormat(block_format="mxfp8"),
    "mxfp6": NumberFormat(block_format="mxfp6"),
    "mxfp4": NumberFormat(block_format="mxfp4"),
    "nvfp4": NumberFormat(block_format="nvfp4"),
}
FORMAT_NAMES = (INTEGER, *NUMBER_FORMATS)
# Range estimators that fit a float format's scale: the min-max ones (a search scores the integer grid).
FLOAT_ESTIMATORS = ("current_minmax", "running_minmax")
