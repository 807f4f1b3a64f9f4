"""The outlier and attention-sink metrics of the later literature (metrics.md, "Metrics from the later
literature"), streamed over an evaluation or a measured training step so our runs sit beside published numbers.

Per layer, on the residual stream (each layer's output, a (B, T, d) tensor; text blocks carry no padding):
  channel_kurtosis      He et al.: s_j = mean over tokens of x[:, j]^2, then mean_j(s_j^2) / (mean_j s_j)^2 (1 when
                        every channel has the same scale); also on the FFN's input to its second matrix
                        (`ffn_channel_kurtosis`)
  token_kurtosis_first  Kaul et al. / OSP: per token, the excess kurtosis over its d channels,
  token_kurtosis_rest   mean((x - mean x)^4) / var(x)^2 - 3, averaged over the first tokens and over the rest
  top1_median           Sun et al.: the largest |x| over the whole set over the median |x| (the median from a
                        histogram of log10 |x| with LOG_BINS bins over 16 decades: within 1% of the exact median)
  massive               how many values exceed both MASSIVE_ABSOLUTE and MASSIVE_RELATIVE x the median (from the
                        same histogram: counted bin by bin, exact except inside the one bin holding the threshold)
  max_attention_logit   the largest |q k^T / sqrt(d)| over the pairs a query may attend (a hook on `scores`, so
                        the layer takes the explicit attention path while it is measured)
Sink^eps_1 (Gu et al.) comes from the attention diagnostics' first-token mass per head: `sink_percent`.
With `positions`, it also sums x and |x| per (position, channel): what the zero-out intervention
(intervention.py) picks its entries from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from quantization.token_mask import real_mask, real_values, token_weights

from ..runtime import max_across_processes, sum_across_processes

SINK_EPS = 0.3  # Gu et al.'s threshold on a head's mean attention to the first token
LOG_BINS = 4096
LOG_RANGE = (-10.0, 6.0)  # log10 |x|: values below 1e-10 (zeros among them) fall into the first bin
MASSIVE_ABSOLUTE = 100.0
MASSIVE_RELATIVE = 1000.0
LAYER_FIGURES = (
    "channel_kurtosis",
    "ffn_channel_kurtosis",
    "token_kurtosis_first",
    "token_kurtosis_rest",
    "top1_median",
    "massive",
    "max_attention_logit",
)


def channel_kurtosis(mean_squares: torch.Tensor) -> float:
    """He et al.'s kurtosis of the per-channel mean squares s_j: mean(s^2) / mean(s)^2."""
    s = mean_squares.double()
    return (s.square().mean() / s.mean().square().clamp_min(torch.finfo(torch.float64).tiny)).item()


def token_excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Per token of a (..., d) tensor, the excess kurtosis over its d channels (population variance)."""
    x = x.float()
    centered = x - x.mean(dim=-1, keepdim=True)
    variance = centered.square().mean(dim=-1)
    return centered.pow(4).mean(dim=-1) / variance.square().clamp_min(torch.finfo(torch.float32).tiny) - 3.0


def bin_edges(device=None) -> torch.Tensor:
    """The LOG_BINS + 1 edges (in |x|) of the magnitude histogram."""
    return torch.logspace(*LOG_RANGE, LOG_BINS + 1, dtype=torch.float64, device=device)


def histogram_median(counts: torch.Tensor) -> float:
    """The median |x| of a magnitude histogram: the geometric middle of the bin holding the middle value."""
    cumulative = counts.double().cumsum(0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] / 2).clamp_max(LOG_BINS - 1))
    edges = bin_edges()
    return float((edges[index] * edges[index + 1]).sqrt())


def count_above(counts: torch.Tensor, threshold: float) -> int:
    """Values of a magnitude histogram in the bins whose lower edge reaches `threshold`."""
    lower = bin_edges()[:-1]
    return int(counts.double()[lower >= threshold].sum())


def sink_percent(attention: dict[str, dict[str, list[float]]], eps: float = SINK_EPS) -> tuple[float, list[float]]:
    """Sink^eps_1 in percent, model-wide and per layer: the share of heads whose mean weight on the first key
    exceeds `eps`."""
    per_layer = [100.0 * sum(m > eps for m in figures["first_token_mass"]) / len(figures["first_token_mass"])
                 for figures in attention.values()]  # fmt: skip
    heads = [len(figures["first_token_mass"]) for figures in attention.values()]
    overall = sum(p * h for p, h in zip(per_layer, heads, strict=True)) / max(sum(heads), 1)
    return overall, per_layer


class LiteratureStatistics:
    """Streams the figures of the module docstring for every layer of `model` (a model of model_classes.py):
    `attached()`, `start_batch(inputs, index)` per batch, then `synced(accelerator)`, like the other probes."""

    def __init__(self, model: nn.Module, positions: int | None = None, logits: bool = True):
        self.model = model
        # The logit hook sits on `scores`, which moves attention to the explicit path: training leaves it out,
        # so a measured step trains exactly as an unmeasured one.
        self.logits = logits
        self.layers = list(model.transformer_layers())
        self.variants = list(model.attention_variants().values())
        wiring = model.family.wiring
        self.ffn_activation = wiring.ffn_activation if wiring is not None else None
        self.positions = positions
        device = next(model.parameters()).device
        hidden = model.config.hidden_size
        self._sums: dict[str, torch.Tensor] = {}
        self._peaks: dict[str, torch.Tensor] = {}
        for layer in range(len(self.layers)):
            # [token kurtosis summed over first tokens, over the rest; sequences, tokens after the first]
            self._sums[f"stream_{layer}"] = torch.zeros(4, dtype=torch.float64, device=device)
            self._sums[f"squares_{layer}"] = torch.zeros(hidden, dtype=torch.float64, device=device)
            self._sums[f"histogram_{layer}"] = torch.zeros(LOG_BINS, dtype=torch.float64, device=device)
            self._peaks[f"peak_{layer}"] = torch.zeros(1, dtype=torch.float32, device=device)
            self._peaks[f"logit_{layer}"] = torch.full((1,), -1.0, dtype=torch.float32, device=device)
            if self.ffn_activation is not None:  # per FFN channel, over the layer's tokens
                width = self.layers[layer].get_submodule(wiring.ffn_in).out_features
                self._sums[f"ffn_squares_{layer}"] = torch.zeros(width, dtype=torch.float64, device=device)
            if positions is not None:
                self._sums[f"position_sum_{layer}"] = torch.zeros(positions, hidden, device=device)
                self._sums[f"position_abs_{layer}"] = torch.zeros(positions, hidden, device=device)
                self._sums[f"position_count_{layer}"] = torch.zeros(positions, dtype=torch.float64, device=device)

    def start_batch(self, inputs: torch.Tensor, index: int) -> None:
        """Nothing per batch: the figures need no token ids."""

    def _stream_hook(self, layer: int):
        def hook(module, args, output):
            x = (output[0] if isinstance(output, tuple) else output).detach().float()  # (B, T, d)
            kurtosis = token_excess_kurtosis(x)  # (B, T)
            weights = token_weights(*x.shape[:2], x.device)  # a padded batch: its real tokens only
            if weights is None:
                counts = kurtosis.new_tensor([x.shape[0], x.shape[0] * (x.shape[1] - 1)])
            else:
                kurtosis = kurtosis * weights
                counts = torch.stack([weights[:, 0].sum(), weights[:, 1:].sum()])
            sums = torch.stack([kurtosis[:, 0].sum(), kurtosis[:, 1:].sum()])
            self._sums[f"stream_{layer}"] += torch.cat([sums, counts]).double()
            rows = real_values(x).reshape(-1, x.shape[-1])  # (real tokens, d)
            self._sums[f"squares_{layer}"] += rows.square().sum(dim=0).double()
            magnitude = rows.abs()
            self._peaks[f"peak_{layer}"] = torch.maximum(self._peaks[f"peak_{layer}"], magnitude.amax().view(1))
            logs = magnitude.clamp_min(10 ** LOG_RANGE[0]).log10()
            self._sums[f"histogram_{layer}"] += torch.histc(logs, LOG_BINS, *LOG_RANGE).double()
            if self.positions is not None:  # per position, over the sequences that reach it
                length = min(x.shape[1], self.positions)
                real = torch.ones(x.shape[:2], device=x.device) if weights is None else weights
                part = x[:, :length] * real[:, :length, None]
                self._sums[f"position_sum_{layer}"][:length] += part.sum(dim=0)
                self._sums[f"position_abs_{layer}"][:length] += part.abs().sum(dim=0)
                self._sums[f"position_count_{layer}"][:length] += real[:, :length].sum(dim=0).double()

        return hook

    def _ffn_hook(self, layer: int):
        def hook(module, args, output):
            squares = output.detach().float().square()
            real = real_mask(squares)
            if real is not None:  # a padded batch: its padding adds zeros (no copy of the real tokens)
                squares.masked_fill_(~real, 0.0)
            self._sums[f"ffn_squares_{layer}"] += squares.flatten(0, -2).sum(dim=0).double()

        return hook

    def _logit_hook(self, layer: int, is_causal: bool):
        def hook(module, args, output):
            magnitude = output.detach().abs().float()  # (B, H, T, S), a fresh tensor: masked in place
            counted = real_mask(magnitude)  # a padded batch: real queries and keys only
            if is_causal:  # only the keys a query may attend (bottom-right aligned, as with a cache)
                queries, keys = magnitude.shape[-2:]
                allowed = torch.ones(queries, keys, dtype=torch.bool, device=magnitude.device).tril(keys - queries)
                counted = allowed if counted is None else counted & allowed
            if counted is not None:  # one pass; |x| >= 0, so the zeros never win the maximum
                magnitude.masked_fill_(~counted, 0.0)
            key = f"logit_{layer}"
            self._peaks[key] = torch.maximum(self._peaks[key], magnitude.amax().view(1))

        return hook

    @contextmanager
    def attached(self):
        handles = []
        for layer, module in enumerate(self.layers):
            handles.append(module.register_forward_hook(self._stream_hook(layer)))
            if self.ffn_activation is not None:
                ffn = module.get_submodule(self.ffn_activation)
                handles.append(ffn.register_forward_hook(self._ffn_hook(layer)))
        for layer, variant in enumerate(self.variants if self.logits else ()):
            handles.append(variant.scores.register_forward_hook(self._logit_hook(layer, variant.is_causal)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def synced(self, accelerator) -> dict:
        """Per-layer lists of every figure (see LAYER_FIGURES), after one sum and one max across processes, and
        with `positions`, the per-layer (positions, d) mean of x and |x| over sequences (host tensors)."""
        sums = dict(zip(self._sums, sum_across_processes(accelerator, list(self._sums.values())), strict=True))
        peaks = dict(zip(self._peaks, max_across_processes(accelerator, list(self._peaks.values())), strict=True))
        figures = {name: [] for name in LAYER_FIGURES}
        means = []
        for layer in range(len(self.layers)):
            first, rest, sequences, rest_count = sums[f"stream_{layer}"].tolist()
            tokens = sequences + rest_count
            if not tokens:
                return {}
            figures["channel_kurtosis"].append(channel_kurtosis(sums[f"squares_{layer}"] / tokens))
            ffn = sums.get(f"ffn_squares_{layer}")
            figures["ffn_channel_kurtosis"].append(channel_kurtosis(ffn / tokens) if ffn is not None else None)
            figures["token_kurtosis_first"].append(first / sequences)
            figures["token_kurtosis_rest"].append(rest / rest_count if rest_count else float("nan"))
            histogram = sums[f"histogram_{layer}"]
            median, peak = histogram_median(histogram), peaks[f"peak_{layer}"].item()
            figures["top1_median"].append(peak / median)
            figures["massive"].append(count_above(histogram, max(MASSIVE_ABSOLUTE, MASSIVE_RELATIVE * median)))
            logit = peaks[f"logit_{layer}"].item()
            figures["max_attention_logit"].append(logit if logit >= 0 else None)  # None: no attention computed
            if self.positions is not None:
                count = (
                    sums[f"position_count_{layer}"].clamp_min(1).unsqueeze(1).to(sums[f"position_sum_{layer}"].dtype)
                )
                means.append((sums[f"position_sum_{layer}"] / count, sums[f"position_abs_{layer}"] / count))
        if not any(v is not None for v in figures["ffn_channel_kurtosis"]):
            del figures["ffn_channel_kurtosis"]
        if means:
            figures["position_means"] = means
        return figures


def literature_results(figures: dict, attention: dict) -> dict:
    """The figures for all_results.json: per-layer lists under `literature`, and the headlines beside them."""
    overall, per_layer = sink_percent(attention) if attention else (float("nan"), [])
    layers = {k: v for k, v in figures.items() if k != "position_means"}
    logits = [v for v in layers.get("max_attention_logit", []) if v is not None]
    return {
        "sink_percent": overall,
        "max_top1_median": max(layers["top1_median"]) if layers else float("nan"),
        "max_attention_logit": max(logits) if logits else float("nan"),
        "literature": {**layers, "sink_percent": per_layer, "sink_eps": SINK_EPS},
    }
