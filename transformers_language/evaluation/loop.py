"""Evaluation on fixed validation examples: the objective's sums over the whole set, reduced once, and its
figures (the language models' token-weighted perplexity with the paper's figure beside it; the image
classifier's loss and top-1 / top-5 accuracy).

Each process evaluates its own contiguous shard of the examples (no duplicates from padding the last batch, so
statistics never count an example twice) and the sums are reduced once at the end.

Probes (activation and attention statistics) ride along: their hooks are attached for the loop only and
each is told the inputs of the batch before it runs; they sync themselves after the loop. A padded batch runs
inside its attention mask's scope (quantization/token_mask.py), so no probe counts a padded token. Objectives
whose figures are not sums (GLUE's correlations) return per-example rows, gathered once at the end.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from torch.utils.data import DataLoader

from quantization.token_mask import real_tokens

from ..objectives import Objective
from ..objectives.inputs import attention_mask, to_device
from ..runtime import progress_bar


@torch.no_grad()
def evaluate(
    accelerator,
    loss_module: torch.nn.Module,
    dataset: Dataset,
    objective: Objective,
    batch_size: int,
    probes: tuple = (),
) -> dict:
    """The objective's validation figures of `loss_module`: an objectives loss module, unwrapped under DDP (whose
    forward would sync buffers, a collective per batch that shards of unequal length cannot match) and wrapped
    under FSDP (which gathers the weights at each forward; there the shorter shards run uncounted filler batches,
    so every process takes part in every gather).

    `dataset` holds the objective's input column and, unless the inputs are their own labels (CLM), `labels`.
    Each probe has `attached()` (a context manager that hooks the model) and `start_batch(inputs, index)`."""
    shard = dataset.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=objective.collate)
    device = accelerator.device
    totals = torch.zeros(objective.evaluation_width, dtype=torch.float64, device=device)  # reduced once, at the end
    was_training = loss_module.training
    loss_module.eval()
    progress = progress_bar(accelerator, loader, desc="Evaluating")
    lockstep_batches = 0
    if accelerator.distributed_type == DistributedType.FSDP:
        lockstep_batches = int(accelerator.gather(torch.tensor([len(loader)], device=device)).max())
    rows = []  # per-example rows of the objectives whose figures are not sums (e.g. a rank correlation)
    with ExitStack() as stack:
        for probe in probes:
            stack.enter_context(probe.attached())
        for index, batch in enumerate(progress):
            inputs, labels = _inputs_and_labels(batch, objective, device)
            with real_tokens(attention_mask(inputs)):  # padding never enters a probe's statistic
                for probe in probes:
                    probe.start_batch(inputs, index)
                with accelerator.autocast():
                    sums, batch_rows = objective.evaluation_batch(loss_module, inputs, labels)
            totals += sums
            if batch_rows is not None:
                rows.append(batch_rows)
    if lockstep_batches > len(loader):  # after the probes detach, so they never see the uncounted batches
        first = objective.collate([dataset[0]]) if objective.collate is not None else dataset[:1]
        inputs, labels = _inputs_and_labels(first, objective, device)
        for _ in range(lockstep_batches - len(loader)):
            with accelerator.autocast():
                loss_module(inputs, labels)
    loss_module.train(was_training)
    gathered = _gather_rows(accelerator, rows, objective.rows_width) if objective.rows_width else None
    return objective.evaluation_results(accelerator.reduce(totals, "sum").tolist(), gathered)


def _gather_rows(accelerator, rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Every process's rows, in process order (shards are contiguous, so this is the dataset's order)."""
    local = torch.cat(rows) if rows else torch.zeros(0, width, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes == 1:
        return local.cpu()
    from accelerate.utils import gather_object

    return torch.cat([part.to(torch.float64) for part in gather_object([local.cpu()])])


def _inputs_and_labels(batch: dict, objective: Objective, device) -> tuple:
    inputs = to_device(objective.inputs_of(batch), device)
    return inputs, batch["labels"].to(device) if "labels" in batch else inputs
