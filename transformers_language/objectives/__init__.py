"""The objectives wing: masked LM, causal LM (language.py), image classification (image_classification.py) and
GLUE sentence(-pair) classification (sequence_classification.py) in one table, with the interface every job
talks to (base.py). Importing the wing gives its public names."""

from ..errors import UsageError
from .base import LossModule, Objective, Targets, derive_seed, safe_exp
from .image_classification import IMAGE_CLASSIFICATION, ImageClassification, MixingArgs, MixTargets
from .language import (
    CausalLMLoss,
    MaskedLM,
    MaskedLMArgs,
    MaskedLMLoss,
    Masking,
    mask_eval_dataset,
)
from .linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum
from .sequence_classification import GLUE, SequenceClassification, SequenceClassificationLoss

OBJECTIVES = {
    "mlm": MaskedLM("mlm", MaskedLMLoss, label_shift=0),
    "clm": Objective("clm", CausalLMLoss),
    IMAGE_CLASSIFICATION.name: IMAGE_CLASSIFICATION,
    GLUE.name: GLUE,
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UsageError(f"Unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


__all__ = [
    "GLUE",
    "IGNORE_INDEX",
    "IMAGE_CLASSIFICATION",
    "OBJECTIVES",
    "CausalLMLoss",
    "ImageClassification",
    "LossModule",
    "MaskedLM",
    "MaskedLMArgs",
    "MaskedLMLoss",
    "Masking",
    "MixTargets",
    "MixingArgs",
    "Objective",
    "SequenceClassification",
    "SequenceClassificationLoss",
    "Targets",
    "derive_seed",
    "get_objective",
    "linear_cross_entropy_sum",
    "mask_eval_dataset",
    "safe_exp",
]
