"""The comparison table of `scripts/compare_quantization.py`: how a checkpoint's headline figure (perplexity, a
GLUE score, top-1) and its gap to FP are written, the mean and spread over calibration draws, and the markdown
table with one row per bit width and recipe and one column per checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ptq.recipes import PTQ_METHODS

UNDEFINED = "undefined"


@dataclass(frozen=True)
class Headline:
    """The figure a comparison reads (the objective's headline) and how its gap is shown."""

    key: str
    higher_is_better: bool

    def cell(self, value: float, spread: float | None = None) -> str:
        """A perplexity as is; an accuracy or GLUE score in points (x 100); `undefined` for a figure that is not a
        number (the correlations of an STS-B model that predicts one similarity for every pair)."""
        if not math.isfinite(value):
            return UNDEFINED
        scale, digits = (100.0, 1) if self.higher_is_better else (1.0, 2)
        text = f"{value * scale:.{digits}f}"
        return text if spread is None else f"{text} ± {spread * scale:.{digits}f}"

    def gap(self, value: float, fp: float) -> tuple[float, str]:
        """(gap, its text): points lost (negative: worse) for a score, % of perplexity gained (positive: worse)."""
        if self.higher_is_better:
            gap = 100.0 * (value - fp)
            return gap, f"{gap:+.1f}"
        gap = 100.0 * (value - fp) / fp
        return gap, f"{gap:+.1f}%"


def mean_and_spread(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def comparison_table(rows: list[dict], columns: dict[str, str], headline: Headline) -> str:
    """Rows: FP, then each bit width and recipe; one column per checkpoint (`columns`: folder name -> heading):
    the figure's mean over the draws, ± their spread, and the gap to FP."""
    cells = {(row["bits"], row["recipe"], row["checkpoint"]): row for row in rows}
    order = list(dict.fromkeys((row["bits"], row["recipe"]) for row in rows))
    lines = ["| bits | recipe | " + " | ".join(columns.values()) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for bits, recipe in order:
        values = []
        for checkpoint in columns:
            row = cells.get((bits, recipe, checkpoint))
            if row is None:
                values.append("n/a")  # a recipe the checkpoint's family cannot take (OS+ on Llama)
            elif bits == "FP" or not math.isfinite(row["value"]):  # no spread or gap: FP, or an undefined figure
                values.append(headline.cell(row["value"]))
            else:
                values.append(f"{headline.cell(row['value'], row['spread'])} ({row['gap_text']})")
        label = "-" if bits == "FP" else PTQ_METHODS[recipe].label
        lines.append(f"| {bits} | {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def gap_panels(rows: list[dict], columns: dict[str, str], bits: list[str]) -> dict:
    """What the comparison plot draws: `gaps[bits][recipe label][column heading] = (mean gap, each draw's gap)`."""
    gaps = {setting: {} for setting in bits}
    for row in rows:
        if row["bits"] != "FP":
            label = PTQ_METHODS[row["recipe"]].label
            gaps[row["bits"]].setdefault(label, {})[columns[row["checkpoint"]]] = (row["gap"], row["draw_gaps"])
    return gaps
