"""Training telemetry for the trackers (TensorBoard): step scalars and, with `--extra_tb_stats`, outlier signs.

Every step: loss, learning rate, grad norm, tokens/s. Every `scalar_interval` steps: the inf-norm of each
module's weight, the inf-norm and kurtosis of the residual stream after each layer (mean over the step's
sequences, plus the maximum), the attention on the first token and its sink ratio (attention_stats.py) per
layer, with the variant's own figures where it has them (row sum, sink mass, exact zeros), the literature's
figures (literature_metrics.py: channel and per-token kurtosis, top-1 / median, massive activations,
Sink^0.3; not the max attention logit, whose hook would move attention off the fused path), and the mean
gate probability per layer and head of gated models. The same per-layer figures go, one JSON line per
measured step, to `growth.jsonl` in the run directory: outlier growth over training without TensorBoard.
Every `hist_interval` steps: histograms of the weights and of each layer's residual stream. Hooks exist only
while a measured step runs (which runs eagerly under --torch_compile); each reduces its output at once into a
few device tensors, and those are synced once, when the step is logged. No activation outlives its
micro-batch.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from quantization.token_mask import current_mask, real_values

from ..data.modalities import probe_inputs
from ..evaluation.attention_stats import AttentionStatistics, gate_mean_per_head
from ..evaluation.literature_metrics import LAYER_FIGURES, LiteratureStatistics, sink_percent
from ..evaluation.metrics import per_sequence_stats
from ..files import strict_json, truncate_jsonl
from ..models.gates import AttentionGate
from ..models.norms import is_norm
from ..runtime import max_across_processes, sum_across_processes

HISTOGRAM_BINS = 64
GROWTH_FILE = "growth.jsonl"
# Per-layer attention figures (means over heads) logged when the layer's variant reports them.
ATTENTION_FIGURES = ("first_token_mass", "sink_ratio", "row_sum", "sink_mass", "exact_zero_fraction")
# The literature's per-layer figures (literature_metrics.py), Sink^0.3 per layer among them.
GROWTH_LITERATURE = (*LAYER_FIGURES, "sink_percent")


def _weight_modules(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear | nn.Embedding) or is_norm(module)) and module.weight is not None
    }


def _device_histogram(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fixed-bin histogram computed on the device (no host sync until it is logged)."""
    values = values.detach().flatten().float()
    low, high = values.min(), values.max()
    width = (high - low).clamp_min(1e-12) / HISTOGRAM_BINS
    index = ((values - low) / width).long().clamp_(0, HISTOGRAM_BINS - 1)
    counts = torch.bincount(index, minlength=HISTOGRAM_BINS)
    return {"low": low, "high": high, "counts": counts, "sum": values.sum(), "sum_squares": values.square().sum()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Telemetry:
    def __init__(
        self,
        accelerator,
        model: nn.Module,
        extra_stats: bool,
        scalar_interval: int,
        hist_interval: int,
        output_dir: Path,
        start_step: int = 0,
    ):
        self.accelerator = accelerator
        self.model = model
        self.extra_stats = extra_stats
        self.scalar_interval = max(scalar_interval, 1)
        self.hist_interval = max(hist_interval, 1)
        self._writer = None
        if extra_stats and accelerator.is_main_process:
            self._writer = accelerator.get_tracker("tensorboard", unwrap=True)
        self._sums: dict[str, torch.Tensor] = {}
        self._histograms: dict[str, dict] = {}
        self._attention: AttentionStatistics | None = None
        self._literature: LiteratureStatistics | None = None
        # Only the first-key figures are logged: no tokenizer, so no delimiter tokens are marked.
        self._inputs = probe_inputs(model.family, None, model.config)
        self.growth_path = Path(output_dir) / GROWTH_FILE
        if extra_stats and accelerator.is_main_process:
            self.growth_path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.growth_path, start_step)  # a resumed run rewrites what came after its checkpoint

    def _scalar_step(self, step: int) -> bool:
        return self.extra_stats and step % self.scalar_interval == 0

    def _hist_step(self, step: int) -> bool:
        return self.extra_stats and step % self.hist_interval == 0

    def _add(self, key: str, values: torch.Tensor) -> None:
        self._sums[key] = values if key not in self._sums else self._sums[key] + values

    def _layer_hook(self, index: int, histogram: bool):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            inf_norm, kurtosis = per_sequence_stats(hidden)
            count = torch.tensor(float(len(inf_norm)), device=inf_norm.device)
            self._add(f"layer_{index}", torch.stack([inf_norm.sum(), kurtosis.sum(), count]).double())
            peak = inf_norm.max().double().view(1)
            key = f"layer_{index}_max"
            self._sums[key] = peak if key not in self._sums else torch.maximum(self._sums[key], peak)
            if histogram and f"activations/layer_{index}" not in self._histograms:  # first micro-batch only
                self._histograms[f"activations/layer_{index}"] = _device_histogram(real_values(hidden))

        return hook

    def _gate_hook(self, index: int):
        def hook(module: AttentionGate, args, output):
            probability = output.detach().float() / module.scale  # (1|B, H, 1|T, 1|d_head)
            per_head = gate_mean_per_head(probability, current_mask()).double()
            self._add(f"gate_{index}", torch.cat([per_head, per_head.new_ones(1)]))

        return hook

    def measures(self, step: int) -> bool:
        """Whether `step` is measured (its forward runs with hooks)."""
        return self._scalar_step(step) or self._hist_step(step)

    @contextmanager
    def measure(self, step: int):
        """Hooks on the residual stream and the gates, only while a measured step runs."""
        if not self.measures(step):
            yield
            return
        handles = []
        for index, layer in enumerate(self.model.transformer_layers()):
            handles.append(layer.register_forward_hook(self._layer_hook(index, self._hist_step(step))))
            gates = [m for m in layer.modules() if isinstance(m, AttentionGate)]
            handles += [gate.register_forward_hook(self._gate_hook(index)) for gate in gates]
        with ExitStack() as stack:
            if self._scalar_step(step):
                self._attention = AttentionStatistics(self.model, self._inputs)
                stack.enter_context(self._attention.attached())
                self._literature = LiteratureStatistics(self.model, logits=False)
                stack.enter_context(self._literature.attached())
                embeddings = self.model.get_input_embeddings()  # its input is each forward's token ids / pixels
                handles.append(embeddings.register_forward_pre_hook(self._start_batch_hook, with_kwargs=True))
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    def _start_batch_hook(self, module, args, kwargs):
        """Tell the attention statistics the inputs of each micro-batch before the model runs on them."""
        self._attention.start_batch(args[0] if args else kwargs["input"], 0)

    def _stats_scalars(self) -> dict[str, float]:
        """Reduce every accumulated statistic across processes at once (one sum, one gather) and read it."""
        sums = {k: v for k, v in self._sums.items() if not k.endswith("_max")}
        peaks = {k: v for k, v in self._sums.items() if k.endswith("_max")}
        reduced = dict(zip(sums, sum_across_processes(self.accelerator, list(sums.values())), strict=True))
        maxima = max_across_processes(self.accelerator, list(peaks.values()))
        peak_of = {key: value.item() for key, value in zip(peaks, maxima, strict=True)}
        scalars = {}
        for key, reduced_values in reduced.items():
            values = reduced_values.tolist()
            if key.startswith("layer_"):
                inf_sum, kurtosis_sum, count = values
                scalars[f"activations/{key}/inf_norm"] = inf_sum / count
                scalars[f"activations/{key}/kurtosis"] = kurtosis_sum / count
                scalars[f"activations/{key}/inf_norm_max"] = peak_of[f"{key}_max"]
            else:
                *per_head, calls = values
                for head, total in enumerate(per_head):
                    scalars[f"gates/layer_{key.removeprefix('gate_')}/head_{head}"] = total / calls
        return scalars

    def log(self, step: int, record: dict) -> None:
        """Log the step's scalars (and measured statistics) to every tracker."""
        scalars = {f"train/{key}": value for key, value in record.items() if key != "step"}
        if self._scalar_step(step):
            norms = _weight_modules(self.model)
            values = torch.stack([w.detach().abs().amax().float() for w in norms.values()]).tolist()
            scalars |= {f"weight_inf_norm/{name}": value for name, value in zip(norms, values, strict=True)}
            stats = self._stats_scalars()
            attention, self._attention = self._attention.synced(self.accelerator), None
            for layer, figures in attention.items():
                for key in ATTENTION_FIGURES:
                    if key in figures:  # the variant's own figures only where it has them
                        stats[f"attention/{layer}/{key}"] = _mean(figures[key])
            literature, self._literature = self._literature.synced(self.accelerator), None
            literature["sink_percent"] = sink_percent(attention)[1] if attention else []
            for key, per_layer in literature.items():
                for layer, value in enumerate(per_layer):
                    if value is not None:
                        stats[f"literature/layer_{layer}/{key}"] = value
            scalars |= stats
            if self.accelerator.is_main_process:
                self._write_growth(step, stats)
        self._sums.clear()  # also after a histogram-only step, whose sums belong to no scalar step
        self.accelerator.log(scalars, step=step)
        if self._hist_step(step):
            self._log_histograms(step)

    def _write_growth(self, step: int, stats: dict[str, float]) -> None:
        """One line of per-layer figures (lists indexed by layer; gate_mean: per layer, per head)."""
        layers = len(self.model.transformer_layers())

        def per_layer(template: str) -> list[float] | None:
            values = [stats.get(template.format(layer=i)) for i in range(layers)]
            return None if None in values else values

        record = {"step": step}
        for name, template in (
            ("kurtosis", "activations/layer_{layer}/kurtosis"),
            ("inf_norm", "activations/layer_{layer}/inf_norm"),
            ("inf_norm_max", "activations/layer_{layer}/inf_norm_max"),
            *((key, f"attention/layer_{{layer}}/{key}") for key in ATTENTION_FIGURES),
            *((key, f"literature/layer_{{layer}}/{key}") for key in GROWTH_LITERATURE),
        ):
            if (values := per_layer(template)) is not None:
                record[name] = values
        gates = [[v for k, v in stats.items() if k.startswith(f"gates/layer_{i}/")] for i in range(layers)]
        if any(gates):
            record["gate_mean"] = gates
        with open(self.growth_path, "a") as handle:
            handle.write(strict_json(record) + "\n")

    def _log_histograms(self, step: int) -> None:
        histograms, self._histograms = self._histograms, {}
        if self._writer is None:
            return
        for name, weight in _weight_modules(self.model).items():
            self._writer.add_histogram(f"weights/{name}", weight.detach().float().cpu(), step)
        for name, hist in histograms.items():
            low, high = hist["low"].item(), hist["high"].item()
            counts = hist["counts"].cpu()
            limits = torch.linspace(low, high, HISTOGRAM_BINS + 1)[1:]
            self._writer.add_histogram_raw(
                name,
                low,
                high,
                int(counts.sum()),
                hist["sum"].item(),
                hist["sum_squares"].item(),
                limits.tolist(),
                counts.tolist(),
                global_step=step,
            )
        self._writer.flush()


def init_tracking(accelerator, settings: dict, project_name: str) -> None:
    """Start the trackers with the run settings (TensorBoard takes only scalar hyperparameters)."""
    scalars = {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool)}
    accelerator.init_trackers(project_name, config=scalars)
