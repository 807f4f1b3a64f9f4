"""Per-channel statistics of a float activation over calibration tokens: what the equivalent transforms are
computed from (SmoothQuant's max|X_j|, OS+'s per-channel min / max and its token sample).

The extremes are reduced inside `observe` and accumulated on the tensor's device; the sample keeps at most
`sample_per_batch` evenly spaced tokens of each batch (OS+ searches its threshold on them), so memory stays
bounded by tokens x channels of the sample, never the activations themselves.
"""

from __future__ import annotations

import torch

from .token_mask import real_values


class ChannelStatistics:
    def __init__(self, sample_per_batch: int = 0):
        self.sample_per_batch = sample_per_batch
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        rows = real_values(x.detach()).reshape(-1, x.shape[-1]).float()  # padding never counts
        low, high = rows.amin(dim=0), rows.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        if self.sample_per_batch:
            stride = max(1, rows.shape[0] // self.sample_per_batch)
            self.samples.append(rows[::stride][: self.sample_per_batch].clone())

    @property
    def absmax(self) -> torch.Tensor:
        self._check()
        return torch.maximum(self.low.abs(), self.high.abs())

    @property
    def sample(self) -> torch.Tensor:
        self._check()
        return torch.cat(self.samples)

    def _check(self) -> None:
        if self.low is None or (self.sample_per_batch and not self.samples):
            raise RuntimeError("These channel statistics have observed nothing: run calibration batches first.")
