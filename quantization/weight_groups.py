"""Grouped weight quantization: one symmetric range per group of `group_size` consecutive input channels of
each output row (the "g128" of W4A16 and GPTQ results), from the weights themselves.

It is the per-channel quantizer applied to the weight viewed as (rows * groups, group_size), so the ranges,
the arithmetic and the saved buffers are those of per-channel quantization, one channel per group.
"""

from __future__ import annotations

import torch

from .quantizer import Quantizer


class WeightGroupQuantizer(Quantizer):
    def __init__(self, n_bits: int, group_size: int, estimator: str = "current_minmax", **estimator_options):
        super().__init__(n_bits, symmetric=True, estimator=estimator, axis=0, **estimator_options)
        self.group_size = group_size

    def grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """The (rows * groups, group_size) view of `weight` whose channels are the groups."""
        if weight.shape[-1] % self.group_size:
            raise ValueError(
                f"A weight of {weight.shape[-1]} input channels does not split into groups of {self.group_size}."
            )
        return weight.reshape(-1, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        return super().forward(self.grouped(x)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.n_bits} bits, symmetric, groups of {self.group_size}, mode={self.mode}"
