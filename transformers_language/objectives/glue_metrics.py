"""GLUE's figures of a task's predictions, exact over the whole evaluation set: accuracy, F1 of the positive class
(MRPC), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B, scipy's). The classification
figures come from the confusion counts; a task's score is the mean of its figures, as GLUE ranks it."""

from __future__ import annotations

import math

import torch
from scipy import stats


def _confusion(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, float]:
    """(true positives, false positives, false negatives, true negatives) of a binary task (1: positive)."""
    predicted, actual = predictions.round().long() == 1, labels.round().long() == 1
    return (
        float((predicted & actual).sum()),
        float((predicted & ~actual).sum()),
        float((~predicted & actual).sum()),
        float((~predicted & ~actual).sum()),
    )


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions.round() == labels.round()).double().mean())


def f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    tp, fp, fn, _ = _confusion(predictions, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_correlation(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    tp, fp, fn, tn = _confusion(predictions, labels)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float(stats.pearsonr(predictions.double().numpy(), labels.double().numpy()).statistic)


def spearmanr(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float(stats.spearmanr(predictions.double().numpy(), labels.double().numpy()).statistic)


GLUE_METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def glue_figures(names: tuple[str, ...], predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Each figure of `names`, and `score`: their mean."""
    figures = {name: GLUE_METRICS[name](predictions, labels) for name in names}
    return figures | {"score": sum(figures.values()) / len(figures)}
