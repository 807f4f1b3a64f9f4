"""The language models' objectives (masked LM, causal LM): their targets, loss modules and settings.

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
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from ..arguments import FRACTION, arg
from ..errors import UsageError
from .base import LossModule, Objective, Targets, derive_seed, safe_exp  # noqa: F401 (the objectives' API)
from .linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum

MASKED_ROWS_BUCKET = 128
EVAL_MASK_CHUNK = 1024  # examples per evaluation-mask generator (a fixed constant, so masks are reproducible)


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


class MaskedLMLoss(LossModule):
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


class CausalLMLoss(LossModule):
    """Summed next-token NLL (the family's body, then its vocabulary projection)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        family = self.model.family
        # No KV cache: OPT builds one by default, concatenating keys and values every layer for nothing.
        hidden = _module(self.model, family.body)(input_ids=input_ids, use_cache=False).last_hidden_state
        # Position t predicts token t + 1; the last position has no target.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return _vocabulary_nll(self.model, hidden.flatten(0, 1), targets.flatten())


@dataclass(frozen=True)
class MaskedLMArgs:
    """The masked-LM objective's flag."""

    mlm_probability: float = arg(0.15, "Share of tokens masked.", FRACTION, type=float)


@dataclass(frozen=True)
class MaskedLM(Objective):
    def flags_class(self, training: bool) -> type:
        return MaskedLMArgs

    def targets(self, preprocessor, config, flags: MaskedLMArgs, training: bool = False) -> Targets:
        return Masking.from_tokenizer(preprocessor, flags.mlm_probability)

    def evaluation_set(self, blocks: Dataset, targets: Targets, seed: int) -> Dataset:
        return mask_eval_dataset(blocks, targets, seed)
