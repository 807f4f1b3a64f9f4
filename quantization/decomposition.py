"""LLM.int8()-style mixed-precision decomposition of a Linear's matmul (Dettmers et al., 2022).

The input channels whose |x| reaches the threshold anywhere in the current batch (at a real token: padding
never counts, token_mask.py) go through the matmul in floating point (with the float weight columns); the rest
of the input is quantized per token (a dynamic quantizer) and multiplied with the quantized weight (per output
channel, set up by the caller). With no outlier channel this is exactly the plain quantized Linear, and with
every channel an outlier exactly the float one. The share of channels kept in floating point is accumulated on
the device (read once, after the evaluation) for the report.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .dynamic import TokenQuantizer
from .sums import hidden_from_sums
from .token_mask import real_values

DEFAULT_THRESHOLD = 6.0


class OutlierDecomposition(nn.Module):
    def __init__(self, input_quantizer: TokenQuantizer, threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        if not threshold >= 0 or math.isnan(threshold):
            raise ValueError(f"The outlier threshold must be >= 0 (inf: no decomposition), got {threshold}.")
        self.input_quantizer = input_quantizer
        self.threshold = threshold
        # Counts on the device: (input channels kept in floating point, batches), summed over batches.
        self.register_buffer("counts", torch.zeros(2, dtype=torch.float64), persistent=False)

    def reset_statistics(self) -> None:
        self.counts.zero_()

    def float_channel_share(self, in_features: int, counts: torch.Tensor | None = None) -> float | None:
        """The mean share of input channels kept in floating point per batch (None before any batch), from this
        module's counts or from `counts` (e.g. summed over processes)."""
        float_channels, batches = (self.counts if counts is None else counts).tolist()
        return None if batches == 0 else float_channels / (batches * in_features)

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, quantized_weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.input_quantizer.mode == "off":
            return F.linear(x, quantized_weight, bias)
        # (in,); of the real tokens only: a padded token never decides which channels stay in floating point
        outliers = (real_values(x.detach()).abs() >= self.threshold).flatten(0, -2).any(dim=0)
        count = outliers.sum()
        self.counts += torch.stack([count.to(self.counts.dtype), self.counts.new_ones(())])
        if not bool(count):
            return F.linear(self.input_quantizer(x), quantized_weight, bias)
        if bool(outliers.all()):
            return F.linear(x, weight, bias)
        regular = self.input_quantizer(x.masked_fill(outliers, 0.0))  # an exact 0 stays 0 on the grid
        with hidden_from_sums():
            return F.linear(regular, quantized_weight, bias) + F.linear(x[..., outliers], weight[:, outliers])

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"
