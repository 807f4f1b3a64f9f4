"""The objective interface every training and evaluation job talks to: targets of a batch, the loss module
(a `LossModule`: the model with its loss), the count a loss sum is divided by, the evaluation sums and figures,
the throughput figure, and the flags.
The base class is the causal LM's; objectives.py (language models) and image_classification.py (ViT) define
the others, and objectives.py holds the table of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn

from .linear_cross_entropy import IGNORE_INDEX


def safe_exp(value: float) -> float:
    """exp, infinite where it overflows."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, step, process), so each stream of masks is independent."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class LossModule(nn.Module):
    """A model with its loss: what accelerate prepares and trains."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):
        """The model's layer classes, which FSDP's transformer wrap policy shards one by one."""
        return getattr(self.model, "_no_split_modules", None)


Targets = Callable[[dict, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""(batch of the dataset's columns, generator) -> (inputs, labels) of a training or calibration batch."""


def _next_tokens(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: the labels are the inputs (the loss shifts them)."""
    return batch["input_ids"], batch["input_ids"]


@dataclass(frozen=True)
class Objective:
    """A pre-training objective: its loss, its targets, its flags and its evaluation set. The base class is the
    causal LM; MaskedLM overrides what masking changes."""

    name: str
    loss_class: type[nn.Module]
    label_shift: int = 1
    """Position t predicts label t + label_shift: 0 for MLM, 1 (the next token) for CLM."""
    input_key: str = "input_ids"
    """The dataset column the model reads."""
    throughput: str = "tokens_per_s"
    """The training log's speed figure: `work(inputs)` per second."""
    evaluation_width: int = 4
    """How many sums `evaluation_sums` returns."""
    reported: tuple[tuple[str, str], ...] = (
        ("perplexity", "perplexity"),
        ("perplexity_mean_of_batch_losses", "perplexity (paper: mean of batch losses)"),
    )
    """The evaluation figures the log shows first: (key, label); the first is the objective's headline."""
    higher_is_better: bool = False
    """Whether a larger headline figure is better (an accuracy) or worse (a perplexity)."""
    rows_width: int = 0
    """Columns of the per-example rows `evaluation_batch` returns (0: none)."""
    collate: Callable[[list[dict]], dict] | None = None
    """How a list of examples becomes a batch (a padded batch's collate; None: torch's default)."""

    def bound(self, config) -> Objective:
        """The objective for a model of `config` (a fine-tuning objective takes its task from it)."""
        return self

    def inputs_of(self, batch: dict):
        """The model inputs of a batch of the dataset's columns: the input column (or a mapping of columns)."""
        return batch[self.input_key]

    def count_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Number of predicted tokens: masked positions (MLM) or next tokens (CLM)."""
        return (labels[:, self.label_shift :] != IGNORE_INDEX).sum()

    def work(self, inputs: torch.Tensor) -> int:
        """What `throughput` counts in a batch of inputs (tokens)."""
        return inputs.numel()

    def evaluation_sums(self, loss_module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One evaluation batch's sums, float64: [NLL, predicted tokens, the batch's mean loss, 1 batch]."""
        nll = loss_module(inputs, labels).double()
        count = self.count_targets(labels).double()
        return torch.stack([nll, count, nll / count.clamp_min(1), torch.ones_like(nll)])

    def evaluation_batch(self, loss_module: nn.Module, inputs, labels: torch.Tensor):
        """(sums, rows) of one evaluation batch: `evaluation_sums`, and per-example rows for figures that sums
        cannot give (None here: every figure of this objective is a sum)."""
        return self.evaluation_sums(loss_module, inputs, labels), None

    def evaluation_results(self, sums: list[float], rows: torch.Tensor | None = None) -> dict:
        """The figures of the summed `evaluation_sums`: token-weighted perplexity, and the paper's mean over
        batches beside it."""
        total_nll, tokens, batch_loss_sum, batches = sums
        loss = total_nll / max(tokens, 1.0)
        batch_mean_loss = batch_loss_sum / max(batches, 1.0)
        return {
            "perplexity": safe_exp(loss),
            "eval_loss": loss,
            "eval_tokens": int(tokens),
            "perplexity_mean_of_batch_losses": safe_exp(batch_mean_loss),
            "eval_loss_mean_of_batch_losses": batch_mean_loss,
        }

    def flags_class(self, training: bool) -> type | None:
        """The typed group of the objective's own flags on the training (`training`) or validation script
        (None: it has none, as CLM)."""
        return None

    def targets(self, preprocessor, config, flags, training: bool = False) -> Targets:
        """The (inputs, labels) of a training (`training`) or calibration batch; `preprocessor` is the tokenizer
        or image processor, `config` the model's, `flags` the objective's typed flags (or None)."""
        return _next_tokens

    def evaluation_set(self, blocks: Dataset, targets: Targets, seed: int) -> Dataset:
        """The validation blocks as evaluated (MLM: with fixed masks of `seed`)."""
        return blocks
