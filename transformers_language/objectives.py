"""The two pre-training objectives (masked LM, causal LM): targets, loss modules and their settings.

A loss module wraps the HF model and returns the summed negative log-likelihood of a batch, so the
training loop can normalise by the number of predicted tokens of the whole optimizer step (exact under
gradient accumulation and several processes) and evaluation can report token-weighted perplexity. The
masked-LM loss runs the prediction head only on the masked positions (~15% of the tokens): the vocabulary
projection is most of BERT-small's compute and memory, and the other positions carry no loss. Both losses
compute the vocabulary projection and its cross-entropy in chunks, never holding all logits
(linear_cross_entropy.py).

MLM masking (80% `[MASK]`, 10% a random token, 10% unchanged) is one function used by training and by the
fixed evaluation masks. Its randomness comes only from the generator passed in: training seeds one per
optimizer step, evaluation one per chunk of examples, so masks never depend on batch size, process count
or an interrupted-and-resumed run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from .errors import UsageError
from .linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum

MASKED_ROWS_BUCKET = 128
EVAL_MASK_CHUNK = 1024  # examples per evaluation-mask generator (a fixed constant, so masks are reproducible)


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


@dataclass(frozen=True)
class Masking:
    """What MLM masking needs to know about the tokenizer, and the masking probability."""

    probability: float
    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, probability: float) -> Masking:
        if tokenizer.mask_token_id is None:
            raise UsageError(f"The tokenizer {tokenizer.name_or_path!r} has no mask token; MLM needs one.")
        if not 0.0 < probability < 1.0:
            raise UsageError(f"--mlm_probability must lie strictly between 0 and 1, got {probability}.")
        return cls(probability, tokenizer.mask_token_id, len(tokenizer), tuple(tokenizer.all_special_ids))

    def __call__(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of a batch's `input_ids`: selected non-special tokens become [MASK] (80%), a random
        token (10%) or stay (10%); labels hold the original token there and IGNORE_INDEX elsewhere."""
        input_ids = batch["input_ids"]
        device = input_ids.device
        special = torch.isin(input_ids, torch.tensor(self.special_ids, device=device))
        selected = (torch.rand(input_ids.shape, generator=generator, device=device) < self.probability) & ~special
        action = torch.rand(input_ids.shape, generator=generator, device=device)
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=generator, device=device)
        inputs = torch.where(selected & (action < 0.8), self.mask_token_id, input_ids)
        inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        labels = torch.where(selected, input_ids, IGNORE_INDEX)
        return inputs, labels


def _mask_chunk(batch: dict, indices: list[int], masking: Masking, seed: int) -> dict:
    generator = torch.Generator().manual_seed(derive_seed(seed, indices[0]))
    inputs, labels = masking({"input_ids": torch.as_tensor(batch["input_ids"])}, generator)
    return {"input_ids": inputs, "labels": labels}


def mask_eval_dataset(dataset: Dataset, masking: Masking, seed: int) -> Dataset:
    """The validation blocks with fixed masks: the same seed gives the same masks in every run (FP and
    quantized evaluation compare the identical masked set), whatever the batch size or process count."""
    return dataset.map(
        _mask_chunk,
        fn_kwargs={"masking": masking, "seed": seed},
        batched=True,
        batch_size=EVAL_MASK_CHUNK,
        with_indices=True,
        keep_in_memory=True,
        desc="Masking validation",
    ).with_format("torch")


def head_nll(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `targets` under the logits of the vocabulary projection `head`: chunked, never holding
    the logits, for a plain Linear; through the module itself when it was swapped (a quantized head
    quantizes its weight and its logits)."""
    if type(head) is nn.Linear:
        return linear_cross_entropy_sum(hidden, head.weight, head.bias, targets)
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


class _LossModule(nn.Module):
    """A model with its loss: what accelerate prepares and trains."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):
        """The model's layer classes, which FSDP's transformer wrap policy shards one by one."""
        return getattr(self.model, "_no_split_modules", None)


def _module(model: nn.Module, path: str) -> nn.Module:
    """`model`'s submodule at a dotted path, looked up by attribute (so it also works through FSDP wrappers,
    and finds a module that W8A8 simulation swapped in)."""
    return functools.reduce(getattr, path.split("."), model)


def _vocabulary_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `targets` under the family's head: its transform (if any), then its vocabulary projection."""
    family = model.family
    if family.head_transform is not None:
        hidden = _module(model, family.head_transform)(hidden)
    return head_nll(_module(model, family.head_projection), hidden, targets)


class MaskedLMLoss(_LossModule):
    """Summed masked-LM NLL, scoring only the masked positions (the family's head transform and vocabulary
    projection, applied to those rows)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        family = self.model.family
        hidden = _module(self.model, family.body)(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        labels = labels.flatten()
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        # The masked count changes every batch; padding it to a multiple of MASKED_ROWS_BUCKET (with ignored
        # rows) keeps tensor sizes to a few values, so the CPU allocator reuses memory instead of fragmenting
        # (BERT-small's peak RSS grew ~10 MiB per step without it).
        padding = -len(rows) % MASKED_ROWS_BUCKET
        targets = F.pad(labels[rows], (0, padding), value=IGNORE_INDEX)
        rows = F.pad(rows, (0, padding))
        return _vocabulary_nll(self.model, hidden[rows], targets)


class CausalLMLoss(_LossModule):
    """Summed next-token NLL (the family's body, then its vocabulary projection)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        family = self.model.family
        # No KV cache: OPT builds one by default, concatenating keys and values every layer for nothing.
        hidden = _module(self.model, family.body)(input_ids=input_ids, use_cache=False).last_hidden_state
        # Position t predicts token t + 1; the last position has no target.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return _vocabulary_nll(self.model, hidden.flatten(0, 1), targets.flatten())


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
    """The evaluation figures the log shows first: (key, label)."""

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

    def evaluation_results(self, sums: list[float]) -> dict:
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

    def add_args(self, group, training: bool) -> None:
        """The objective's own flags on the training (`training`) or validation script (none for CLM)."""

    def targets(self, preprocessor, config, args, training: bool = False) -> Targets:
        """The (inputs, labels) of a training (`training`) or calibration batch; `preprocessor` is the tokenizer
        or image processor, `config` the model's."""
        return _next_tokens

    def evaluation_set(self, blocks: Dataset, targets: Targets, seed: int) -> Dataset:
        """The validation blocks as evaluated (MLM: with fixed masks of `seed`)."""
        return blocks


@dataclass(frozen=True)
class MaskedLM(Objective):
    def add_args(self, group, training: bool) -> None:
        group.add_argument("--mlm_probability", type=float, default=0.15, help="Share of tokens masked.")

    def targets(self, preprocessor, config, args, training: bool = False) -> Targets:
        return Masking.from_tokenizer(preprocessor, args.mlm_probability)

    def evaluation_set(self, blocks: Dataset, targets: Targets, seed: int) -> Dataset:
        return mask_eval_dataset(blocks, targets, seed)


# The image objective subclasses Objective (defined above), so it is imported here, after it.
from .image_classification import IMAGE_CLASSIFICATION  # noqa: E402

OBJECTIVES = {
    "mlm": MaskedLM("mlm", MaskedLMLoss, label_shift=0),
    "clm": Objective("clm", CausalLMLoss),
    IMAGE_CLASSIFICATION.name: IMAGE_CLASSIFICATION,
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UsageError(f"Unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]
