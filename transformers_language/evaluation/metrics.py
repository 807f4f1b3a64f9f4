"""Activation statistics reduced on the device where the activation lives, streamed over an evaluation.

For one tensor of one sequence, flattened to a vector v (T x d values):
  inf-norm  max |v|
  kurtosis  mean((v - mean v)^4) / var(v)^2 with the population variance (Pearson, non-excess: a Gaussian
            gives 3). The paper's code used the unbiased std plus 1e-6 in the denominator; with T x d in the
            thousands the two differ by well under 0.1%.
  outliers  the values with |v - mean v| > 6 std(v) (population std), the paper's definition.
Both per-sequence figures are averaged over the validation sequences, per tensor, as are the first token's max |x|
and the later tokens' (where "massive activations" sit: the first token of decoders). In a padded batch, a sequence is
its real tokens (T_b x d values): padding enters no figure. Beyond those, each tensor
keeps its true maximum, its >6 sigma count per hidden dimension (the last axis), the largest magnitude per
hidden dimension, and per token id how often a sequence's maximum sat on that token and how many >6 sigma
values it carried: the channel and token views of outlier studies.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantization.token_mask import token_weights

from ..runtime import max_across_processes, sum_across_processes
from ..wiring import Site
from .literature_metrics import LOG_BINS, LOG_RANGE, histogram_median

OUTLIER_SIGMAS = 6.0
# Layout of the per-site vectors of running sums (device) and counts (host).
_SUMS = ("inf_norm", "kurtosis", "outliers", "first_token", "later_tokens")
_COUNTS = ("sequences", "kurtosis_sequences", "values")


def per_sequence_stats(activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inf-norm, kurtosis) per sequence of a (B, T, ...) activation, as float32 tensors of shape (B,); in a
    padded batch's scope (quantization/token_mask.py), over each sequence's real tokens."""
    values = activation.detach().float()
    weights = token_weights(*values.shape[:2], values.device) if values.dim() >= 3 else None
    if weights is None:
        values = values.flatten(1)
        inf_norm = values.abs().amax(dim=1)
        centered = values - values.mean(dim=1, keepdim=True)
        variance = centered.square().mean(dim=1)
        fourth = centered.pow(4).mean(dim=1)
    else:
        real = weights.reshape(*weights.shape, *[1] * (values.dim() - 2)).expand_as(values).flatten(1)
        values = values.flatten(1)
        count = real.sum(dim=1)
        inf_norm = (values.abs() * real).amax(dim=1)
        centered = (values - (values * real).sum(dim=1, keepdim=True) / count.unsqueeze(1)) * real
        variance = centered.square().sum(dim=1) / count
        fourth = centered.pow(4).sum(dim=1) / count
    kurtosis = fourth / variance.square().clamp_min(torch.finfo(torch.float32).tiny)
    return inf_norm, kurtosis


@dataclass
class SiteFigures:
    """Every statistic of one site over the whole evaluation (host tensors, after the sync)."""

    site: Site
    inf_norm: float
    """Mean over sequences of the per-sequence inf-norm (the paper's figure)."""
    inf_norm_max: float
    """The true maximum |value| over the whole evaluation."""
    kurtosis: float
    sequences: int
    kurtosis_sequences: int
    outliers: int
    values: int
    dim_outliers: torch.Tensor
    dim_peak: torch.Tensor
    token_maxima: torch.Tensor
    token_outliers: torch.Tensor
    median_abs: float = float("nan")
    """The median |value| over the whole evaluation (of a log-magnitude histogram: to about 1%)."""
    first_token_inf_norm: float = float("nan")
    """Mean over sequences of max |x| at the first position."""
    later_tokens_inf_norm: float = float("nan")
    """Mean over sequences of max |x| over every later position (NaN for one-token sequences)."""


class _Accumulator:
    """The running sums of one site: device tensors, plus the counts the host knows without a sync."""

    def __init__(self, hidden: int, vocab_size: int, device: torch.device):
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        self.counts = [0] * len(_COUNTS)
        self.dim_outliers = torch.zeros(hidden, dtype=torch.float64, device=device)
        self.token_maxima = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.token_outliers = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.dim_peak = torch.zeros(hidden, dtype=torch.float32, device=device)
        self.histogram = torch.zeros(LOG_BINS, dtype=torch.float64, device=device)  # of log10 |x|: the median

    def summed(self) -> list[torch.Tensor]:
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.sums.device)
        return [
            torch.cat([self.sums, counts]),
            self.dim_outliers,
            self.token_maxima,
            self.token_outliers,
            self.histogram,
        ]

    @torch.no_grad()
    def add(
        self,
        activation: torch.Tensor,
        token_ids: torch.Tensor,
        with_kurtosis: bool,
        scratch: torch.Tensor,
        real: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> None:
        """Fold one batch in. `scratch` is reusable fp32 memory of at least the activation's size: a fresh
        multi-MiB tensor per call would cost page faults that exceed the arithmetic on CPU. `real` (a padded
        batch): the (B, T) 0 / 1 weights of its real tokens, their count per sequence (B,) and in all; every
        figure is then over real tokens only."""
        # Sequences come from the tokens: OPT's FFN sees its input flattened to (B * T, d).
        (batch, length), hidden = token_ids.shape, self.dim_peak.numel()
        if activation.numel() != batch * length * hidden:
            raise ValueError(
                f"A measured activation of shape {tuple(activation.shape)} does not hold {batch} x {length} tokens "
                f"x hidden size {hidden}."
            )
        x = activation.detach().float().reshape(batch, length, hidden)
        values = x.view(batch, -1)
        work = scratch[: values.numel()].view_as(values)
        weights = None if real is None else real[0].unsqueeze(-1)  # (B, T, 1)
        # Few ops, each one cheap pass into reused memory. On CPU, per-op overhead and memory passes are the
        # cost: max-with-indices over T x d, var_mean, pow(4) and bool-mask sums take 2-15x longer than the
        # forms below. Everything stays on the device, without a host sync.
        magnitude = torch.abs(values, out=work).view_as(x)
        if weights is not None:  # a padded token's |x| becomes 0: never a maximum
            magnitude.mul_(weights)
        real_magnitudes = magnitude if weights is None else magnitude[real[0].bool()]
        logs = real_magnitudes.clamp_min(10 ** LOG_RANGE[0]).log10_()
        self.histogram += torch.histc(logs, LOG_BINS, *LOG_RANGE).double()
        per_position = magnitude.amax(dim=2)  # (B, T): padded positions are 0
        peak, where = per_position.max(dim=1)  # per sequence, and the position where it sits
        first_token = per_position[:, 0].sum()
        later_tokens = per_position[:, 1:].amax(dim=1).sum() if length > 1 else peak.new_zeros(())
        torch.maximum(self.dim_peak, magnitude.view(-1, hidden).amax(dim=0), out=self.dim_peak)
        self.token_maxima.index_add_(
            0, token_ids.gather(1, where.unsqueeze(1)).squeeze(1), torch.ones_like(peak, dtype=torch.float64)
        )

        if weights is None:
            count = values.shape[1]
            squares = torch.sub(values, values.mean(dim=1, keepdim=True), out=work)
        else:  # mean and moments over each sequence's real tokens; a padded token's deviation is 0
            count = (real[1] * hidden).unsqueeze(1)  # (B, 1)
            mean = (x * weights).view(batch, -1).sum(dim=1, keepdim=True) / count
            squares = torch.sub(values, mean, out=work)
            squares.view_as(x).mul_(weights)
        variance = torch.linalg.vector_norm(squares, dim=1, keepdim=True).square_().div_(count)
        squares.square_()
        kurtosis = peak.new_zeros(())
        if with_kurtosis:  # mean((x - mean)^4) / var^2, the 4th moment as the squared 2-norm of the squares
            fourth = torch.linalg.vector_norm(squares, dim=1, keepdim=True).square_().div_(count).squeeze(1)
            kurtosis = (fourth / variance.squeeze(1).square().clamp_min(torch.finfo(torch.float32).tiny)).sum()
        # 1.0 where (x - mean)^2 > 36 var, else 0.0, written over the squares in one pass.
        outlier = torch.gt(squares, OUTLIER_SIGMAS**2 * variance, out=squares).view_as(x)
        outlier_count = outlier.sum(dim=2)  # (B, T)
        self.dim_outliers += outlier.view(-1, hidden).sum(dim=0)  # exact in fp32 below 2^24 rows
        self.token_outliers.index_add_(0, token_ids.flatten(), outlier_count.flatten().double())
        self.sums += torch.stack([peak.sum(), kurtosis, outlier_count.sum(), first_token, later_tokens]).double()
        # Counts are known on the host: no device round trip per batch.
        self.counts[0] += batch
        self.counts[1] += batch if with_kurtosis else 0
        self.counts[2] += values.numel() if real is None else real[2] * hidden


class ActivationStatistics:
    """Streams the statistics of `sites` of `model` over an evaluation.

    Use `with stats.attached(): for i, batch in ...: stats.start_batch(inputs, i); model(...)` and then
    `stats.synced(accelerator)`. Hooks exist only inside `attached()`, each reduces its tensor at once into the
    site's device accumulators, and one sum plus one max across processes happen in `synced`. Kurtosis uses
    the first `kurtosis_max_batches` batches of each process (None: all); everything else uses all batches.
    Every site's last dimension is `hidden_size` unless the site names its own width (`Site.width`).
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        hidden_size: int,
        vocab_size: int,
        kurtosis_max_batches: int | None = None,
        token_ids: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.to_token_ids = token_ids  # inputs -> (B, T) ids of the token analysis (None: the inputs are ids)
        self.sites = sites
        self.kurtosis_max_batches = kurtosis_max_batches
        # Allocated up front, so a process whose shard is empty still joins the sync with the same shapes.
        device = next(model.parameters()).device
        self._accumulators = {site.name: _Accumulator(site.width or hidden_size, vocab_size, device) for site in sites}
        self._token_ids: torch.Tensor | None = None
        self._real: tuple | None = None
        self._with_kurtosis = True
        self._scratch: torch.Tensor | None = None

    def start_batch(self, inputs, index: int) -> None:
        """The inputs of the batch about to run (for the token analysis) and its index in this process; inside a
        padded batch's scope (quantization/token_mask.py), its real tokens."""
        self._token_ids = inputs if self.to_token_ids is None else self.to_token_ids(inputs)
        self._with_kurtosis = self.kurtosis_max_batches is None or index < self.kurtosis_max_batches
        weights = token_weights(*self._token_ids.shape, self._token_ids.device)
        self._real = None if weights is None else (weights, weights.sum(dim=1), int(weights.sum()))

    def _observe(self, site: Site, activation: torch.Tensor) -> None:
        if self._scratch is None or self._scratch.numel() < activation.numel():
            self._scratch = torch.empty(activation.numel(), dtype=torch.float32, device=activation.device)
        self._accumulators[site.name].add(activation, self._token_ids, self._with_kurtosis, self._scratch, self._real)

    @contextmanager
    def attached(self):
        handles = []
        for site in self.sites:
            module = self.model.get_submodule(site.module_path)
            if site.tap == "input":
                hook = lambda m, args, site=site: self._observe(site, args[0])  # noqa: E731
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = lambda m, args, out, site=site: self._observe(site, out[0] if isinstance(out, tuple) else out)  # noqa: E731
                handles.append(module.register_forward_hook(hook))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._token_ids = self._scratch = None

    def synced(self, accelerator) -> dict[str, SiteFigures]:
        """Reduce every accumulator across processes at once and return the figures per site name."""
        accumulators = [self._accumulators[site.name] for site in self.sites]
        summed = sum_across_processes(accelerator, [t for acc in accumulators for t in acc.summed()])
        peaks = max_across_processes(accelerator, [acc.dim_peak for acc in accumulators])
        figures = {}
        for index, (site, dim_peak) in enumerate(zip(self.sites, peaks, strict=True)):
            totals, dim_outliers, token_maxima, token_outliers, histogram = summed[5 * index : 5 * index + 5]
            totals = dict(zip(_SUMS + _COUNTS, totals.tolist(), strict=True))
            kurtosis_sequences = totals["kurtosis_sequences"]
            figures[site.name] = SiteFigures(
                site=site,
                inf_norm=totals["inf_norm"] / max(totals["sequences"], 1.0),
                inf_norm_max=dim_peak.max().item(),
                kurtosis=totals["kurtosis"] / kurtosis_sequences if kurtosis_sequences else float("nan"),
                sequences=int(totals["sequences"]),
                kurtosis_sequences=int(kurtosis_sequences),
                outliers=int(totals["outliers"]),
                values=int(totals["values"]),
                dim_outliers=dim_outliers,
                dim_peak=dim_peak,
                token_maxima=token_maxima,
                token_outliers=token_outliers,
                median_abs=histogram_median(histogram) if histogram.sum() > 0 else float("nan"),
                first_token_inf_norm=totals["first_token"] / max(totals["sequences"], 1.0),
                later_tokens_inf_norm=totals["later_tokens"] / max(totals["sequences"], 1.0),
            )
        return figures
