"""The demos' side-by-side table of trained methods: each method's row (FP, W8A8 and second-data perplexity, the
outlier figures of its FP validation, its per-layer figures and its logged growth) and the Markdown table, with
the per-layer and growth panels the plots draw."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..training.telemetry import GROWTH_FILE

LLAMA_FIGURES = ("max_ffn_product_inf_norm", "max_first_token_inf_norm", "max_later_tokens_inf_norm")
PER_LAYER = {
    "kurtosis": "Residual-stream kurtosis (FP)",
    "inf_norm": "Residual-stream inf-norm (FP)",
    "sink_ratio": "First-token attention / uniform (FP)",
}
GROWTH = {
    "inf_norm": "residual inf-norm",
    "top1_median": "top-1 / median |x|",
    "kurtosis": "residual kurtosis",
    "sink_ratio": "sink ratio",
}
GROWTH_BASELINES = {"kurtosis": 3.0, "sink_ratio": 1.0}  # a Gaussian's kurtosis; uniform attention


def head_means(results: dict, key: str) -> list[float]:
    """Per layer, the mean over heads of one attention figure of a validation's results."""
    layers = [results["attention"][f"layer_{i}"] for i in range(len(results["attention"]))]
    return [sum(layer[key]) / len(layer[key]) for layer in layers]


def per_layer_figures(results: dict) -> dict[str, list[float]]:
    """Residual-stream (decoder-layer output) kurtosis and inf-norm, and the first-token attention mass and
    sink ratio (mean over heads), per layer."""
    stream = sorted(
        (r for r in results["activations"].values() if r["kind"] == "layer_output"), key=lambda r: r["layer"]
    )
    return {
        "kurtosis": [r["kurtosis"] for r in stream],
        "inf_norm": [r["inf_norm"] for r in stream],
        **{key: head_means(results, key) for key in ("first_token_mass", "sink_ratio")},
    }


def method_row(run_dir: Path, fp: dict, w8a8: dict, second: dict | None) -> dict:
    """A method's row: its FP, W8A8 and second-data validations' results and the growth its training logged."""
    return {
        "fp_perplexity": fp["perplexity"],
        "w8a8_perplexity": w8a8["perplexity"],
        "second_perplexity": second["perplexity"] if second else None,
        "sink_percent": fp["sink_percent"],
        "max_top1_median": fp["max_top1_median"],
        "max_attention_logit": fp["max_attention_logit"],
        "zero_out": {k: fp["zero_out"][k]["perplexity"] for k in ("zero", "mean")} if "zero_out" in fp else None,
        "literature": fp["literature"],
        "max_inf_norm": fp["max_inf_norm"],
        "avg_kurtosis": fp["avg_kurtosis"],
        "max_kurtosis_layers": fp["max_kurtosis_layers"],
        # Llama's own figures (families.py): the SwiGLU product's max, the first token's and the later ones'
        **{key: fp[key] for key in LLAMA_FIGURES if key in fp},
        "per_layer": per_layer_figures(fp),
        "growth": read_growth(run_dir),
    }


def read_growth(run_dir: Path) -> list[dict]:
    """The run's logged per-layer figures, one record per logging step."""
    return [json.loads(line) for line in (run_dir / GROWTH_FILE).read_text().splitlines() if line]


def _figure(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def method_table(rows: dict[str, dict]) -> str:
    """The side-by-side comparison as a Markdown table."""
    header = (
        "| method | FP ppl | W8A8 ppl | W8A8 gap | WikiText-2 ppl | max inf-norm | top-1 / median | Sink^0.3 "
        "| max attn logit | zero-out ppl (zero / mean) | avg kurtosis | residual kurtosis per layer "
        "| sink ratio per layer |"
    )
    lines = [header, "|" + " --- |" * 13]
    for method, row in rows.items():
        gap = row["w8a8_perplexity"] / row["fp_perplexity"] - 1 if math.isfinite(row["w8a8_perplexity"]) else math.inf
        zero_out = row.get("zero_out")
        intervention = "-" if zero_out is None else f"{zero_out['zero']:.2f} / {zero_out['mean']:.2f}"
        lines.append(
            f"| {method} | {row['fp_perplexity']:.2f} | {row['w8a8_perplexity']:.2f} | {gap:+.1%} "
            f"| {_figure(row['second_perplexity'])} | {row['max_inf_norm']:.1f} | {row['max_top1_median']:.0f} "
            f"| {row['sink_percent']:.0f}% | {row['max_attention_logit']:.1f} | {intervention} "
            f"| {row['avg_kurtosis']:.1f} "
            f"| {' / '.join(f'{v:.1f}' for v in row['per_layer']['kurtosis'])} "
            f"| {' / '.join(f'{v:.1f}' for v in row['per_layer']['sink_ratio'])} |"
        )
    return "\n".join(lines) + "\n"
