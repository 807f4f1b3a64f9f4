"""Per-token dynamic quantization: each row of the last dimension gets its range at run time from its own min
and max (ZeroQuant; LLM.int8()'s vector-wise quantization), with no calibration.

A row is one token's channels, and for attention scores or probabilities (B, H, T, S) one query's values
over the keys. Asymmetric rows widen their range to include 0, as static ranges do; a symmetric grid is
signed when the tensor has negative values. Calibration leaves it alone: while the other quantizers observe
it quantizes too if they quantize what they observe (so they see what the quantized model produces).
"""

from __future__ import annotations

import torch

from .affine import scale_and_zero_point
from .quantizer import Quantizer, fake_quantize_broadcast_no_grad


def row_ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of each row, shaped (..., 1) to broadcast against `x`."""
    values = x.detach().float()
    return values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)


class TokenQuantizer(Quantizer):
    def __init__(self, n_bits: int = 8, symmetric: bool = False, in_place: bool = False):
        super().__init__(n_bits, symmetric, estimator="current_minmax", in_place=in_place)

    @property
    def is_frozen(self) -> bool:
        return True  # nothing to calibrate

    @property
    def needs_calibration(self) -> bool:
        return False

    def freeze(self) -> None:
        self.mode = "quantize"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point, q_min, q_max = scale_and_zero_point(*row_ranges(x), self.n_bits, self.symmetric)
        if torch.is_grad_enabled() and x.requires_grad:
            rows = x.reshape(-1, x.shape[-1])
            out = torch.fake_quantize_per_channel_affine(
                rows.float(), scale.flatten(), zero_point.flatten(), 0, q_min, q_max
            )
            return out.to(x.dtype).reshape(x.shape)
        zero = zero_point.float()
        return fake_quantize_broadcast_no_grad(x, 1.0 / scale, scale, q_min - zero, q_max - zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off" or (self.mode == "observe" and not self.quantize_while_observing):
            return x
        return self.quantize(x)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.n_bits} bits, {kind}, per-token dynamic, mode={self.mode}"
