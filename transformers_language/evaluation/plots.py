"""PNG plots of an evaluation's outlier figures (`--plot`): per-layer inf-norm and kurtosis bars, and a heatmap
of which hidden dimensions carry the >6 sigma values of the residual stream, layer by layer; and the demo's
side-by-side comparison of attention methods, at the end of training and over it (growth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend, files only
from matplotlib.ticker import ScalarFormatter

from ..files import write_png_atomic
from .metrics import SiteFigures
from .outlier_report import TOP_K, top_dims


def _position(figures: SiteFigures, layers: int) -> int:
    return layers if figures.site.layer is None else figures.site.layer


def _per_layer_bars(figures: dict[str, SiteFigures], statistic: str, title: str, path: Path, log: bool) -> None:
    layers = 1 + max(f.site.layer for f in figures.values() if f.site.layer is not None)
    kinds = list(dict.fromkeys(f.site.kind for f in figures.values()))
    width = 0.8 / len(kinds)
    has_model_sites = any(f.site.layer is None for f in figures.values())
    fig = Figure(figsize=(max(6.0, 0.45 * (layers + 1) * len(kinds)), 4.0))
    ax = fig.subplots()
    for offset, kind in enumerate(kinds):
        chosen = [f for f in figures.values() if f.site.kind == kind]
        x = np.array([_position(f, layers) for f in chosen]) + (offset - (len(kinds) - 1) / 2) * width
        ax.bar(x, [getattr(f, statistic) for f in chosen], width=width, label=kind)
    ticks = list(range(layers + int(has_model_sites)))
    ax.set_xticks(ticks, [str(t) for t in range(layers)] + (["final"] if has_model_sites else []))
    ax.set_xlabel("layer")
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    write_png_atomic(fig, path)


def _dims_heatmap(figures: dict[str, SiteFigures], stream_kind: str, path: Path) -> None:
    rows = sorted((f for f in figures.values() if f.site.kind == stream_kind), key=lambda f: f.site.layer)
    dims = sorted({d["dim"] for f in rows for d in top_dims(f, TOP_K)})
    shares = np.array([[f.dim_outliers[d].item() / max(f.outliers, 1) for d in dims] for f in rows])
    fig = Figure(figsize=(max(5.0, 0.45 * len(dims) + 2.0), max(3.0, 0.4 * len(rows) + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(dims)), [str(d) for d in dims], rotation=90)
    ax.set_yticks(range(len(rows)), [str(f.site.layer) for f in rows])
    ax.set_xlabel("hidden dimension")
    ax.set_ylabel("layer")
    ax.set_title(f"Share of the layer's >6σ values per hidden dim ({stream_kind})", fontsize="medium")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    write_png_atomic(fig, path)


def write_plots(figures: dict[str, SiteFigures], stream_kind: str, output_dir: Path) -> list[Path]:
    """Write the three PNGs into `output_dir` and return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in ("inf_norm_per_layer.png", "kurtosis_per_layer.png", "outlier_dims.png")]
    _per_layer_bars(figures, "inf_norm", "Mean per-sequence inf-norm", paths[0], log=False)
    _per_layer_bars(figures, "kurtosis", "Mean per-sequence kurtosis (Pearson)", paths[1], log=True)
    _dims_heatmap(figures, stream_kind, paths[2])
    return paths


def write_method_comparison(per_layer: dict[str, dict[str, list[float]]], titles: dict[str, str], path: Path) -> Path:
    """One panel per figure of `titles` (e.g. residual-stream kurtosis per layer), with one bar per method and
    layer: `per_layer[method][figure]` holds the per-layer values."""
    methods = list(per_layer)
    width = 0.8 / len(methods)
    fig = Figure(figsize=(5.0 * len(titles), 4.0))
    for ax, (key, title) in zip(np.atleast_1d(fig.subplots(1, len(titles))), titles.items(), strict=True):
        for offset, method in enumerate(methods):
            values = per_layer[method][key]
            x = np.arange(len(values)) + (offset - (len(methods) - 1) / 2) * width
            ax.bar(x, values, width=width, label=method)
        ax.set_xticks(range(len(values)), [str(layer) for layer in range(len(values))])
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(fig, path)
    return path


def write_growth(
    growth: dict[str, list[dict]], titles: dict[str, str], path: Path, baselines: dict[str, float] | None = None
) -> Path:
    """Per-layer figures against the training step: one row per figure of `titles` (a key of the growth
    records, e.g. residual kurtosis), one column per layer, one line per method. `growth[method]` holds the
    run's growth.jsonl records; `baselines[figure]` draws a dashed reference (e.g. 3, a Gaussian's kurtosis)."""
    baselines = baselines or {}
    layers = max(len(records[0][key]) for records in growth.values() if records for key in titles)
    fig = Figure(figsize=(3.2 * layers, 2.8 * len(titles)))
    axes = np.atleast_2d(fig.subplots(len(titles), layers, squeeze=False))
    for row, (key, title) in enumerate(titles.items()):
        for layer in range(layers):
            ax = axes[row, layer]
            for method, records in growth.items():
                ax.plot([r["step"] for r in records], [r[key][layer] for r in records], label=method)
            if key in baselines:
                ax.axhline(baselines[key], color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"layer {layer}: {title}", fontsize="medium")
            ax.set_xlabel("step")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(fig, path)
    return path


def write_quantization_comparison(
    gaps: dict[str, dict[str, dict[str, tuple[float, list[float]]]]], path: Path, axis: str
) -> Path:
    """One panel per bit width, the gap to FP (`axis` names it) of every recipe, one bar per checkpoint at the mean
    over calibration draws with a whisker over the draws' range: `gaps[bits][recipe][checkpoint] = (mean, draws)`.
    A symmetric-log axis keeps a fraction of a point and a collapse readable."""
    panels = list(gaps)
    recipes = list(dict.fromkeys(recipe for bits in panels for recipe in gaps[bits]))
    checkpoints = list(dict.fromkeys(c for bits in panels for recipe in gaps[bits] for c in gaps[bits][recipe]))
    width = 0.8 / len(checkpoints)
    fig = Figure(figsize=(max(6.0, 0.7 * len(recipes) * len(panels)), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, bits in zip(axes, panels, strict=True):
        for offset, checkpoint in enumerate(checkpoints):
            cells = [gaps[bits].get(recipe, {}).get(checkpoint, (np.nan, [np.nan])) for recipe in recipes]
            means = np.array([mean for mean, _ in cells])
            # Equal draws can leave their mean an ulp outside them: a whisker is never negative.
            low = np.maximum(0.0, np.array([mean - min(draws) for mean, draws in cells]))
            high = np.maximum(0.0, np.array([max(draws) - mean for mean, draws in cells]))
            x = np.arange(len(recipes)) + (offset - (len(checkpoints) - 1) / 2) * width
            ax.bar(x, means, width=width, label=checkpoint, yerr=np.stack([low, high]), capsize=2, ecolor="black")
        ax.set_xticks(range(len(recipes)), recipes, rotation=45, ha="right", fontsize="small")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(bits, fontsize="medium")
    axes[0].set_ylabel(axis)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(fig, path)
    return path
