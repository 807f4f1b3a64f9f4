"""Outlier figures of an evaluation as results (for all_results.json) and log lines.

From the synced per-site statistics (metrics.py) and attention diagnostics (attention_stats.py) this builds:
the family's headline figures under the paper's names (families.py `headlines`), the true maximum and the
>6 sigma count over all measured tensors, and per measured tensor its figures with the outlier analysis:
the hidden dimensions that carry the most >6 sigma values (the same few channels across inputs) and the
tokens (token ids, or a ViT's sequence positions) where sequence maxima and outliers sit, by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from ..families import Headline
from .metrics import OUTLIER_SIGMAS, SiteFigures

logger = logging.getLogger(__name__)

TOP_K = 5


def _ranked(primary: torch.Tensor, secondary: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries by `primary`, ties broken by `secondary` (both descending)."""
    order = torch.argsort(secondary, descending=True, stable=True)
    order = order[torch.argsort(primary[order], descending=True, stable=True)]
    return order[:k].tolist()


def top_dims(figures: SiteFigures, k: int = TOP_K) -> list[dict]:
    """The hidden dimensions with the most >6 sigma values (then the largest magnitude)."""
    total = max(figures.outliers, 1)
    return [
        {
            "dim": dim,
            "outliers": int(figures.dim_outliers[dim]),
            "outlier_share": figures.dim_outliers[dim].item() / total,
            "max_abs": figures.dim_peak[dim].item(),
        }
        for dim in _ranked(figures.dim_outliers, figures.dim_peak.double(), k)
    ]


def top_tokens(figures: SiteFigures, token_name: Callable[[int], str], k: int = TOP_K) -> list[dict]:
    """The tokens carrying the most >6 sigma values (then the most sequence maxima)."""
    outliers, sequences = max(figures.outliers, 1), max(figures.sequences, 1)
    ranked = _ranked(figures.token_outliers, figures.token_maxima, k)
    return [
        {
            "token": token_name(token_id),
            "token_id": token_id,
            "outlier_share": figures.token_outliers[token_id].item() / outliers,
            "maxima_share": figures.token_maxima[token_id].item() / sequences,
        }
        for token_id in ranked
        if figures.token_outliers[token_id] > 0 or figures.token_maxima[token_id] > 0
    ]


def site_record(figures: SiteFigures, token_name: Callable[[int], str], k: int = TOP_K) -> dict:
    return {
        "kind": figures.site.kind,
        "layer": figures.site.layer,
        "inf_norm": figures.inf_norm,
        "inf_norm_max": figures.inf_norm_max,
        "median_abs": figures.median_abs,
        "max_over_median": figures.inf_norm_max / figures.median_abs if figures.median_abs > 0 else None,
        "kurtosis": figures.kurtosis,
        "outliers": figures.outliers,
        "outlier_fraction": figures.outliers / max(figures.values, 1),
        "sequences": figures.sequences,
        "kurtosis_sequences": figures.kurtosis_sequences,
        "top_dims": top_dims(figures, k),
        "top_tokens": top_tokens(figures, token_name, k),
    }


def headline_figures(figures: dict[str, SiteFigures], headlines: tuple[Headline, ...]) -> dict[str, float]:
    values = {}
    for headline in headlines:
        chosen = [
            getattr(f, headline.statistic)
            for f in figures.values()
            if headline.kinds is None or f.site.kind in headline.kinds
        ]
        values[headline.key] = max(chosen) if headline.reduce == "max" else sum(chosen) / len(chosen)
    return values


def outlier_results(
    figures: dict[str, SiteFigures],
    attention: dict,
    headlines: tuple[Headline, ...],
    token_name: Callable[[int], str],
    k: int = TOP_K,
) -> dict:
    """Every outlier figure: headlines first, then per measured tensor and per attention layer."""
    return headline_figures(figures, headlines) | {
        "max_abs_activation": max(f.inf_norm_max for f in figures.values()),
        "outliers_6sigma": sum(f.outliers for f in figures.values()),
        "activations": {name: site_record(f, token_name, k) for name, f in figures.items()},
        "attention": attention,
    }


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def log_results(results: dict, headlines: tuple[Headline, ...], reported: tuple[tuple[str, str], ...]) -> None:
    """One log line per figure of the objective (`reported`: key, label) and per headline figure (the paper's
    names), then per measured tensor and attention layer."""
    for key, label in reported:
        logger.info("%s: %s", label, _number(results[key], 4))
    for headline in headlines:
        digits = 2 if headline.key == "avg_kurtosis" else 1
        logger.info("%s: %s", headline.label, _number(results[headline.key], digits))
    logger.info("Max |activation| (true max): %s", _number(results["max_abs_activation"], 1))
    logger.info("Values beyond %g std: %d", OUTLIER_SIGMAS, results["outliers_6sigma"])
    for name, record in results["activations"].items():
        dims = ", ".join(
            f"{d['dim']} (max {d['max_abs']:.1f}, {d['outlier_share']:.0%})" for d in record["top_dims"][:3]
        )
        tokens = ", ".join(
            f"{t['token']!r} ({t['outlier_share']:.0%} of >6σ, {t['maxima_share']:.0%} of maxima)"
            for t in record["top_tokens"][:3]
        )
        logger.info(
            "%s: inf norm %.2f (true max %.2f), kurtosis %.2f, >6σ values %d; top dims (share of >6σ) %s; "
            "top tokens %s",
            name,
            record["inf_norm"],
            record["inf_norm_max"],
            record["kurtosis"],
            record["outliers"],
            dims,
            tokens,
        )
    for layer, figures in results["attention"].items():
        parts = [f"{key} [{', '.join(f'{v:.3f}' for v in values)}]" for key, values in figures.items()]
        logger.info("attention %s per head: %s", layer, "; ".join(parts))
