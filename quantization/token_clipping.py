"""Token-wise clipping (Outlier Suppression, Wei et al. 2022): activation ranges from per-token statistics.

Coarse stage. `TokenQuantileEstimator` keeps each calibration token's max and min of the activation (a token is
a row of the last dimension; for attention scores or probabilities, one query's values over the keys) and
proposes [the (1 - q)-quantile of the token minima, the q-quantile of the token maxima] (numpy's linear
interpolation). A few tokens carry the largest outliers, so clipping them costs little while the range of every
other token gets finer. It is not in the estimator registry: the points that use it are chosen with
`QuantConfig.token_clipping_points`, and its quantile is searched, not set. `search_quantile` picks q on a grid:
for each candidate it re-freezes every such quantizer from the statistics already kept (no recalibration) and
scores the model's final output against the float model's; the q with the least loss wins, and when that is the
grid's lowest, the search goes on below it until the loss rises.

Fine stage. `learn_ranges` starts from the coarse ranges and learns each quantizer's two ends with
straight-through gradients of the same loss (LSQ+-style), then freezes them. The ends are learnt as
log-factors of the coarse ones, so one learning rate suits ranges of any size and an end at 0 stays there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .affine import learnable_fake_quantize
from .estimators import RangeEstimator, _linear
from .quantizer import Quantizer

DEFAULT_QUANTILES = (1.0, 0.99999, 0.9999, 0.999, 0.99)


class TokenQuantileEstimator(RangeEstimator):
    """Quantiles of the per-token maxima / minima (per tensor only: a token's extremes span its channels)."""

    reads_rows = True

    def __init__(self, *args, quantile: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.axis is not None or self.percentile is not None:
            raise ValueError("Token-wise clipping ranges are per tensor and take no percentile.")
        self.quantile = quantile
        self.token_maxima: list[torch.Tensor] = []
        self.token_minima: list[torch.Tensor] = []

    @property
    def quantile(self) -> float:
        return self._quantile

    @quantile.setter
    def quantile(self, value: float) -> None:
        if not 0.5 < value <= 1.0:
            raise ValueError(f"A token-wise clipping quantile lies in (0.5, 1], got {value}.")
        self._quantile = value

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().float().reshape(-1, x.shape[-1])
        self.token_maxima.append(rows.amax(dim=1))
        self.token_minima.append(rows.amin(dim=1))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_maxima:  # else: a loaded state, whose range is in the buffers
            maxima = torch.cat(self.token_maxima).reshape(1, -1)
            minima = torch.cat(self.token_minima).reshape(1, -1)
            self.low = _linear(minima, 1.0 - self.quantile).reshape(())
            self.high = _linear(maxima, self.quantile).reshape(())
        return super().range()

    def extra_repr(self) -> str:
        return f"quantile={self.quantile}"


def token_clipping_quantizers(quantizers: Sequence[nn.Module]) -> list[Quantizer]:
    return [q for q in quantizers if isinstance(getattr(q, "estimator", None), TokenQuantileEstimator)]


def widened_quantile(quantile: float) -> float | None:
    """The next quantile below `quantile` when the best one sits at the grid's low edge: twice the clipped tail
    (0.99 -> 0.98 -> 0.96 -> ...), None once that would reach 0.5 (a range that clips half of the tokens)."""
    candidate = 1.0 - 2.0 * (1.0 - quantile)
    return candidate if candidate > 0.5 else None


@torch.no_grad()
def search_quantile(
    quantizers: Sequence[Quantizer], quantiles: Sequence[float], loss: Callable[[], float]
) -> tuple[float, dict[float, float]]:
    """Freeze `quantizers` (calibrated, with TokenQuantileEstimator) at each of `quantiles`, score `loss()` (the
    quantized model's final output against the float one), and leave them frozen at the best. While the best is
    the lowest quantile tried, the search goes on below it (`widened_quantile`) until the loss rises. Returns
    (q, losses by q: every candidate scored)."""
    if not quantizers:
        raise ValueError("No token-wise clipping quantizer to search (QuantConfig.token_clipping_points).")
    losses = {}

    def score(quantile: float) -> None:
        for quantizer in quantizers:
            quantizer.estimator.quantile = quantile
            quantizer.freeze()
        losses[quantile] = loss()

    for quantile in quantiles:
        score(quantile)
    finite = [q for q in losses if math.isfinite(losses[q])]
    if not finite:
        raise FloatingPointError(
            f"Token-wise clipping: the loss is not finite for any quantile searched ({', '.join(map(str, losses))}); "
            "the quantized model's output is NaN or infinite at every one: check the model's weights and the bit "
            "widths."
        )
    best = min(finite, key=lambda q: (losses[q], -q))  # ties: the least clipping
    while best == min(losses) and (candidate := widened_quantile(best)) is not None:
        score(candidate)
        if not losses[candidate] < losses[best]:  # risen (or not finite): the best stays
            break
        best = candidate
    for quantizer in quantizers:
        quantizer.estimator.quantile = best
        quantizer.freeze()
    return best, losses


class LearnableRange(nn.Module):
    """The two ends of a quantizer's range as coarse_end * exp(log_factor), with its learnable fake quantizer."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor, n_bits: int, symmetric: bool):
        super().__init__()
        self.register_buffer("coarse_low", low.detach().float().clone())
        self.register_buffer("coarse_high", high.detach().float().clone())
        self.log_factors = nn.Parameter(torch.zeros(2, device=low.device))
        self.n_bits, self.symmetric = n_bits, symmetric

    def ends(self) -> tuple[torch.Tensor, torch.Tensor]:
        factors = self.log_factors.exp()
        return self.coarse_low * factors[0], self.coarse_high * factors[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return learnable_fake_quantize(x, *self.ends(), self.n_bits, self.symmetric)


def learn_ranges(
    quantizers: Sequence[Quantizer], loss: Callable[[int], torch.Tensor], steps: int, learning_rate: float = 1e-2
) -> list[float]:
    """Learn the ranges of frozen `quantizers` for `steps` Adam steps on `loss(step)` (differentiable in the
    ranges; the caller keeps everything else out of the graph), then freeze them at the learnt ends. Returns the
    loss of every step."""
    ranges = []
    for quantizer in quantizers:
        if quantizer.axis is not None:
            raise ValueError("Learnt clipping ranges are per tensor.")
        low, high = quantizer.calibrated_range()
        quantizer.learnable_range = LearnableRange(low, high, quantizer.n_bits, quantizer.symmetric)
        quantizer.set_mode("learn")
        ranges.append(quantizer.learnable_range)
    optimizer = torch.optim.Adam([r.log_factors for r in ranges], lr=learning_rate)
    history = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                value = loss(step)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                history.append(float(value.detach()))
    finally:
        for quantizer, learnt in zip(quantizers, ranges, strict=True):
            with torch.no_grad():
                quantizer.freeze(*learnt.ends())
            quantizer.learnable_range = None
    return history
