"""The comparison table's cells: the figure in its unit, the mean and sample spread over draws, the gap to FP with
the sign of each kind of figure, and a figure that is not a number (an STS-B model predicting one similarity)."""

import math

import pytest

from transformers_language.jobs.comparison_table import UNDEFINED, Headline, comparison_table, mean_and_spread

SCORE = Headline("glue_score", higher_is_better=True)
PERPLEXITY = Headline("perplexity", higher_is_better=False)


def test_mean_and_sample_spread():
    assert mean_and_spread([2.0]) == (2.0, None)
    mean, spread = mean_and_spread([1.0, 2.0, 6.0])
    assert mean == 3.0 and spread == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))


def test_gap_signs_mean_worse_the_same_way_for_scores_and_perplexity():
    assert SCORE.gap(0.80, 0.85) == (pytest.approx(-5.0), "-5.0")  # points lost
    assert PERPLEXITY.gap(22.0, 20.0) == (pytest.approx(10.0), "+10.0%")  # perplexity gained
    assert SCORE.cell(0.8512, 0.0031) == "85.1 ± 0.3" and PERPLEXITY.cell(20.123) == "20.12"


def _row(bits, recipe, value, gap_text=None, spread=None):
    return {"bits": bits, "recipe": recipe, "checkpoint": "stsb", "value": value, "spread": spread,
            "gap_text": gap_text}  # fmt: skip


def test_an_undefined_score_is_written_as_such_without_a_gap():
    rows = [_row("FP", "fp", 0.87), _row("W8A8", "per_tensor", 0.86, "-1.0", 0.002)]
    rows.append(_row("W4A4KV4", "per_tensor", float("nan"), "+nan", None))
    table = comparison_table(rows, {"stsb": "STS-B"}, SCORE).splitlines()
    assert table[2].endswith("| 87.0 |") and table[3].endswith("| 86.0 ± 0.2 (-1.0) |")
    assert table[4].endswith(f"| {UNDEFINED} |") and "nan" not in "\n".join(table)
    assert SCORE.cell(float("nan")) == UNDEFINED
