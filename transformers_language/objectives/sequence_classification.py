"""The GLUE objective (BERT with a classifier): summed cross-entropy over classes, or summed squared error for a
regression task (STS-B); the task's GLUE figures (glue_metrics.py) from every prediction of the evaluation set.

Inputs are a padded batch's mapping of columns (input_ids, token_type_ids, attention_mask); a loss sums over
examples, so the training loop divides by the examples of the whole optimizer step. The objective is bound to the
model's task (`bound(config)`), which decides its figures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F

from ..glue_tasks import TASK_KEY, GlueTask, get_task
from .base import LossModule, Objective, Targets
from .glue_metrics import glue_figures
from .inputs import pad_batch

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class SequenceClassificationLoss(LossModule):
    """A classifier (or regressor, one output) with its summed loss."""

    def forward(self, inputs: dict, labels: torch.Tensor, with_predictions: bool = False):
        logits = self.model(**inputs).logits.float()
        if logits.shape[-1] == 1:  # regression: the score itself
            predictions = logits.squeeze(-1)
            loss = F.mse_loss(predictions, labels.float(), reduction="sum")
        else:
            loss = F.cross_entropy(logits, labels, reduction="sum")
            predictions = logits.argmax(dim=-1).float()
        return (loss, predictions) if with_predictions else loss


def _inputs_and_labels(batch: dict, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}, batch["labels"]


@dataclass(frozen=True)
class SequenceClassification(Objective):
    """A GLUE task: sentence (pair) in, a class or a score out."""

    task: GlueTask | None = None
    """The task the objective is bound to (None: unbound, before the model's config is known)."""

    def bound(self, config) -> SequenceClassification:
        task = get_task(getattr(config, TASK_KEY))
        reported = (("score", "GLUE score"), *((name, name) for name in task.metrics), ("eval_loss", "loss"))
        return replace(self, task=task, reported=reported)

    def inputs_of(self, batch: dict) -> dict:
        return _inputs_and_labels(batch, None)[0]

    def count_targets(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor(labels.shape[0], device=labels.device)

    def work(self, inputs: dict) -> int:
        return inputs["input_ids"].shape[0]

    def targets(self, preprocessor, config, flags, training: bool = False) -> Targets:
        return _inputs_and_labels

    def evaluation_set(self, examples: Dataset, targets: Targets, seed: int) -> Dataset:
        return examples

    def evaluation_batch(self, loss_module: nn.Module, inputs: dict, labels: torch.Tensor):
        """[loss sum, examples], and a (prediction, label) row per example."""
        loss, predictions = loss_module(inputs, labels, with_predictions=True)
        sums = torch.stack([loss.double(), torch.tensor(float(labels.shape[0]), dtype=torch.float64)])
        return sums.to(loss.device), torch.stack([predictions.double(), labels.double()], dim=1)

    def evaluation_results(self, sums: list[float], rows: torch.Tensor | None = None) -> dict:
        loss_sum, examples = sums
        figures = glue_figures(self.task.metrics, rows[:, 0], rows[:, 1])
        return figures | {"eval_loss": loss_sum / max(examples, 1.0), "eval_examples": int(examples)}


GLUE = SequenceClassification(
    "glue",
    SequenceClassificationLoss,
    label_shift=0,
    throughput="examples_per_s",
    evaluation_width=2,
    reported=(("score", "GLUE score"),),
    higher_is_better=True,
    rows_width=2,
    collate=pad_batch,
)
