"""Range estimators, in a registry keyed by the names users type (`--ranges_weights`, `--ranges_acts`).

  current_minmax   min / max of the last observed batch (of the tensor itself, for weights)
  running_minmax   exponential moving average of per-batch min / max (momentum 0.9; the first batch
                   initialises)
  MSE              the clipping range minimising ||x - Q(x)||^2, by grid search
  L<p>             the same search minimising sum |x - Q(x)|^p (e.g. L2.4)
With `percentile=P` the min-max estimators use the (100 - P)th and Pth percentiles of the batch instead of its
min and max, by nearest rank or, with `interpolation="linear"`, between the two nearest ranks as
`numpy.percentile` does (the paper's definition), computed with torch on the tensor's device (kthvalue: no
size limit, no host copy).

The search estimators start from the batch's min / max and, per observed batch, look for the best of G
fractions of them (symmetric: G clipping values; asymmetric: a G x G grid of low and high ends). They search
coarse to fine: every s-th fraction (s ~ sqrt(G)) first, then every fraction within s of the best coarse one,
per channel. That scores ~3 sqrt(G) candidates instead of G (29 instead of 100; 74 instead of 400 for the
asymmetric grid) and finds the same optimum as the full grid whenever the error falls and then rises along the
grid, which is the shape of the clipping trade-off. Candidates are scored at once on the device, in chunks that
bound the temporary memory. Over several batches the estimators keep the mean of the per-batch optima. All
estimators work per tensor or per channel (`axis`).
"""

from __future__ import annotations

import math
import re

import torch

from .affine import scale_and_zero_point
from .buffers import CalibratedState

_LP_NAME = re.compile(r"^L(\d+(?:\.\d*)?|\.\d+)$")
SEARCH_CHUNK_ELEMENTS = 1 << 24  # candidate x value temporaries per step (64 MiB in fp32)

ESTIMATORS: dict[str, type[RangeEstimator]] = {}


def register_estimator(name: str):
    def decorator(cls):
        ESTIMATORS[name] = cls
        return cls

    return decorator


def _by_channel(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(C, n) view of the values per channel; C = 1 per tensor."""
    x = x.float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _shaped(values: torch.Tensor, axis: int | None) -> torch.Tensor:
    return values.reshape(()) if axis is None else values


def _min_max(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) min and max per channel of the (C, n) view. A single channel takes one pass (aminmax over all
    elements); per channel, amin / amax along a dimension are 8-10x faster on CPU than aminmax along it."""
    if flat.shape[0] == 1:
        low, high = torch.aminmax(flat)
        return low.reshape(1), high.reshape(1)
    return flat.amin(dim=1), flat.amax(dim=1)


def _nearest_rank(flat: torch.Tensor, fraction: float) -> torch.Tensor:
    count = flat.shape[1]
    return flat.kthvalue(min(count, max(1, math.ceil(fraction * count))), dim=1).values


def _linear(flat: torch.Tensor, fraction: float) -> torch.Tensor:
    """numpy.percentile's default: position (n - 1) * fraction in the sorted values, interpolated."""
    position = (flat.shape[1] - 1) * fraction
    below = math.floor(position)
    lower = flat.kthvalue(below + 1, dim=1).values
    if position == below:
        return lower
    upper = flat.kthvalue(below + 2, dim=1).values
    return lower + (position - below) * (upper - lower)


# How a percentile picks among the sorted values of a batch.
PERCENTILE_INTERPOLATIONS = {"nearest": _nearest_rank, "linear": _linear}


def batch_extremes(x: torch.Tensor, axis: int | None, percentile: float | None = None, interpolation: str = "nearest"):
    """(low, high) of one batch: min / max, or the (100 - P)th / Pth percentiles."""
    flat = _by_channel(x, axis)
    if percentile is None:
        low, high = _min_max(flat)
        return _shaped(low, axis), _shaped(high, axis)
    pick = PERCENTILE_INTERPOLATIONS[interpolation]
    return _shaped(pick(flat, (100 - percentile) / 100), axis), _shaped(pick(flat, percentile / 100), axis)


class RangeEstimator(CalibratedState):
    """Observes tensors and proposes a (low, high) range, per tensor or per channel along `axis`."""

    reads_rows = False
    """Whether it needs the rows of the last dimension (per-token statistics) rather than any set of values."""
    keeps_extremes = False
    """Whether it keeps only the minimum and maximum of what it observes (the min / max estimators)."""

    def __init__(
        self,
        n_bits: int,
        symmetric: bool,
        axis: int | None,
        percentile: float | None = None,
        interpolation: str = "nearest",
    ):
        super().__init__()
        if percentile is not None and not 50 < percentile <= 100:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile}.")
        if interpolation not in PERCENTILE_INTERPOLATIONS:
            raise ValueError(
                f"Unknown percentile interpolation {interpolation!r}; valid: {', '.join(PERCENTILE_INTERPOLATIONS)}."
            )
        self.n_bits, self.symmetric, self.axis, self.percentile = n_bits, symmetric, axis, percentile
        self.interpolation = interpolation
        self.register_buffer("low", torch.empty(0))
        self.register_buffer("high", torch.empty(0))

    @property
    def reads_extremes_only(self) -> bool:
        """Whether only the minimum and maximum of what it observes count (a per-tensor min / max without
        percentiles), so any view that keeps them will do (token_mask.real_extremes: each row's, uncopied)."""
        return self.keeps_extremes and self.percentile is None and self.axis is None

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError  # every registered estimator defines it

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.low.numel() == 0:
            raise RuntimeError(f"{type(self).__name__} has observed nothing: pass calibration data first.")
        return self.low, self.high


@register_estimator("current_minmax")
class CurrentMinMax(RangeEstimator):
    keeps_extremes = True

    def observe(self, x: torch.Tensor) -> None:
        self.low, self.high = batch_extremes(x, self.axis, self.percentile, self.interpolation)


@register_estimator("running_minmax")
class RunningMinMax(RangeEstimator):
    keeps_extremes = True

    def __init__(self, *args, momentum: float = 0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}.")
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        low, high = batch_extremes(x, self.axis, self.percentile, self.interpolation)
        if self.low.numel() == 0:
            self.low, self.high = low, high
        else:
            self.low = self.momentum * self.low + (1 - self.momentum) * low
            self.high = self.momentum * self.high + (1 - self.momentum) * high


def quantization_error(
    flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor, n_bits: int, symmetric: bool, p: float
):
    """sum |x - Q(x)|^p per candidate and channel: flat (C, n), low / high (K, C) -> errors (K, C). Each candidate
    range gets the grid `freeze` would give it (affine.scale_and_zero_point): a symmetric grid is signed when
    the candidates' low ends are negative, so pass low = 0 for data without negative values."""
    scale, zero, q_min, q_max = scale_and_zero_point(low, high, n_bits, symmetric)
    scale, zero = scale.unsqueeze(-1), zero.float().unsqueeze(-1)  # (K, C, 1)
    # One (K, C, n) temporary, updated in place; the zero point only where it is not 0.
    error = flat.div(scale).round_()
    if not symmetric:
        error.add_(zero)
    error.clamp_(q_min, q_max)
    if not symmetric:
        error.sub_(zero)
    error.mul_(scale).sub_(flat)
    return (error.square_() if p == 2 else error.abs_().pow_(p)).sum(dim=-1)


class SearchEstimator(RangeEstimator):
    """Grid search of the range minimising the L_p quantization error (see the module docstring)."""

    p: float = 2.0

    def __init__(self, *args, grid_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.percentile is not None:
            raise ValueError(
                f"percentile={self.percentile} applies to current_minmax / running_minmax, not to a search estimator."
            )
        self.grid_size = grid_size or (100 if self.symmetric else 20)
        self.batches = 0

    def _errors(self, flat: torch.Tensor, low_c: torch.Tensor, high_c: torch.Tensor) -> torch.Tensor:
        """Errors (K, C) of candidate ranges (K, C), in chunks of at most SEARCH_CHUNK_ELEMENTS temporaries."""
        step = max(1, SEARCH_CHUNK_ELEMENTS // flat.numel())
        return torch.cat(
            [
                quantization_error(flat, low_c[i : i + step], high_c[i : i + step], self.n_bits, self.symmetric, self.p)
                for i in range(0, low_c.shape[0], step)
            ]
        )

    def _search(self, flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best (low, high) per channel among the fractions k / G (k = 1..G) of the batch's (low, high)."""
        size, channels = self.grid_size, flat.shape[0]
        stride = max(1, round(math.sqrt(size)))
        dims = 1 if self.symmetric else 2  # a symmetric range has one free end; an asymmetric one two
        device = flat.device
        # A symmetric grid is signed when the data has negative values: decided once (a device sync) per batch.
        signed = self.symmetric and bool((low < 0).any())
        # Coarse: every stride-th index counted down from G, so the full range is always a candidate.
        coarse_axis = torch.arange(size, 0, -stride, device=device)
        coarse = torch.cartesian_prod(*[coarse_axis] * dims).reshape(-1, dims)  # (Kc, dims) indices
        coarse = coarse[:, None, :].expand(-1, channels, -1)  # (Kc, C, dims)
        best = self._best(flat, low, high, coarse, signed)  # (C, dims)
        # Fine: every index within stride of the coarse optimum, per channel (clamped to the grid; repeats are
        # harmless). The coarse optimum is among them, so the fine optimum is never worse.
        offsets = torch.arange(1 - stride, stride, device=device)
        offsets = torch.cartesian_prod(*[offsets] * dims).reshape(-1, dims)  # (Kf, dims)
        fine = (best[None] + offsets[:, None, :]).clamp(1, size)  # (Kf, C, dims)
        best = self._best(flat, low, high, fine, signed)
        low_best, high_best = self._ranges(low, high, best[None], signed)
        return low_best[0], high_best[0]

    def _ranges(self, low: torch.Tensor, high: torch.Tensor, indices: torch.Tensor, signed: bool):
        """Candidate ranges (K, C) for grid indices (K, C, dims)."""
        fractions = indices.float() / self.grid_size
        if self.symmetric:  # clip the absolute maximum; the grid is [-clip, clip] if `signed`, else [0, clip]
            clip = fractions[..., 0] * torch.maximum(low.abs(), high.abs())
            return (-clip if signed else torch.zeros_like(clip)), clip
        return fractions[..., 0] * low, fractions[..., 1] * high

    def _best(
        self, flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor, indices: torch.Tensor, signed: bool
    ) -> torch.Tensor:
        """The grid indices (C, dims) of the lowest-error candidate per channel."""
        errors = self._errors(flat, *self._ranges(low, high, indices, signed))
        best = errors.argmin(dim=0)  # per channel
        return indices[best, torch.arange(flat.shape[0], device=flat.device)]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        flat = _by_channel(x, self.axis)
        low, high = _min_max(flat)
        low, high = low.clamp_max(0), high.clamp_min(0)
        low_best, high_best = self._search(flat, low, high)
        low_best, high_best = _shaped(low_best, self.axis), _shaped(high_best, self.axis)
        if self.batches == 0 or self.low.numel() == 0:
            self.low, self.high = low_best, high_best
            self.batches = 0
        else:  # running mean of the per-batch optima
            self.low = self.low + (low_best - self.low) / (self.batches + 1)
            self.high = self.high + (high_best - self.high) / (self.batches + 1)
        self.batches += 1


@register_estimator("MSE")
class MSEEstimator(SearchEstimator):
    p = 2.0


class LpEstimator(SearchEstimator):
    def __init__(self, *args, p: float, **kwargs):
        super().__init__(*args, **kwargs)
        if not p > 0:
            raise ValueError(f"L<p> needs p > 0, got {p}.")
        self.p = p


ESTIMATOR_NAMES = (*ESTIMATORS, "L<p>")


def build_estimator(name: str, n_bits: int, symmetric: bool, axis: int | None, **options) -> RangeEstimator:
    """The estimator called `name` (a registry key, or L<p> such as L2.4)."""
    lp = _LP_NAME.match(name)
    if lp is not None:
        return LpEstimator(n_bits, symmetric, axis, p=float(lp.group(1)), **options)
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown range estimator {name!r}; valid estimators: {', '.join(ESTIMATOR_NAMES)} (e.g. L2.4)."
        )
    if name != "running_minmax":
        options.pop("momentum", None)
    return ESTIMATORS[name](n_bits, symmetric, axis, **options)
