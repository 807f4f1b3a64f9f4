"""The model families (BERT, OPT): every fact that makes one family differ from the other, in one table.

A family names its model class, its pre-training objective, the flag and defaults of its sequence length,
its Adam betas, its dropout config keys, its config defaults for from-scratch models, where the W8A8
quantizers go, and the paper's quantization protocol for it. Code asks the family instead of branching on a
name, so a new family is one entry here (plus its model class, objective and wiring).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Family:
    model_type: str
    weight_ranges: str
    """The paper's weight range estimator for this family (BERT min-max, OPT MSE)."""


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", weight_ranges="minmax"),
    "opt": Family("opt", weight_ranges="MSE"),
}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UsageError(f"Unknown model type {model_type!r}; valid model types: {', '.join(FAMILIES)}.")
    return FAMILIES[model_type]
