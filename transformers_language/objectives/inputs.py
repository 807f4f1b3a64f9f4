"""A batch's model inputs, whatever the objective: one tensor (token ids of a block, pixels) or a mapping of
tensors (a padded batch of sentence pairs: input_ids, token_type_ids, attention_mask). The loops and the
post-training steps move, split, join and count them through these helpers, and read the attention mask that
says which tokens are real (quantization/token_mask.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

ModelInputs = torch.Tensor | Mapping[str, torch.Tensor]


def to_device(inputs: ModelInputs, device) -> ModelInputs:
    if isinstance(inputs, Mapping):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


def attention_mask(inputs: ModelInputs) -> torch.Tensor | None:
    """The (B, T) mask of real tokens, or None: every token is real (blocks, images)."""
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def batch_size(inputs: ModelInputs) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return first.shape[0]


def split_inputs(inputs: ModelInputs, sizes: list[int]) -> list[ModelInputs]:
    """`inputs` cut along the batch into parts of `sizes` examples."""
    if not isinstance(inputs, Mapping):
        return list(inputs.split(sizes))
    columns = {key: value.split(sizes) for key, value in inputs.items()}
    return [{key: parts[index] for key, parts in columns.items()} for index in range(len(sizes))]


def concat_batches(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Micro-batches (columns by name) as one batch. Padded batches of different lengths are right-padded to the
    longest with zeros first: an attention mask of 0 marks the added positions, so their ids never matter."""
    joined = {}
    for key in parts[0]:
        tensors = [part[key] for part in parts]
        if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
            length = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in tensors]
        joined[key] = torch.cat(tensors)
    return joined


def pad_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    """A batch of tokenized examples, every token column right-padded with zeros to the longest example (the
    attention mask's zeros mark the padding)."""
    longest = max(len(example["input_ids"]) for example in examples)
    batch = {"labels": torch.tensor([example["labels"] for example in examples])}
    for key in examples[0]:
        if key != "labels":
            column = torch.zeros(len(examples), longest, dtype=torch.long)
            for row, example in enumerate(examples):
                column[row, : len(example[key])] = torch.as_tensor(example[key])
            batch[key] = column
    return batch
