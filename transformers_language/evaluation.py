"""Perplexity of a model on fixed validation blocks, token-weighted, with the paper's figure beside it.

`perplexity` is exp(total NLL / total predicted tokens) over the whole validation set. The paper's code
averaged per-batch mean losses instead; that figure is reported as `perplexity_mean_of_batch_losses` so
numbers stay comparable. Each process evaluates its own contiguous shard of the examples (no duplicates
from padding the last batch, so statistics never count a sequence twice) and the sums are reduced once at
the end. An overflowing exp is infinity.

Probes (activation and attention statistics) ride along: their hooks are attached for the loop only and
each is told the tokens of the batch before it runs; they sync themselves after the loop.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .objectives import Objective


def safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_perplexity(
    accelerator,
    loss_module: torch.nn.Module,
    dataset: Dataset,
    objective: Objective,
    batch_size: int,
    probes: tuple = (),
) -> dict:
    """Validation loss and perplexity of `loss_module`: an objectives loss module, unwrapped under DDP (whose
    forward would sync buffers, a collective per batch that shards of unequal length cannot match) and wrapped
    under FSDP (which gathers the weights at each forward; there the shorter shards run uncounted filler batches,
    so every process takes part in every gather).

    `dataset` holds `input_ids` and, for MLM, the fixed masked inputs' `labels`; CLM predicts its inputs.
    Each probe has `attached()` (a context manager that hooks the model) and `start_batch(input_ids, index)`."""
    shard = dataset.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False)
    device = accelerator.device
    # [total NLL, predicted tokens, sum of per-batch mean losses, batches], reduced once after the loop.
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = loss_module.training
    loss_module.eval()
    progress = tqdm(loader, desc="Evaluating", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    lockstep_batches = 0
    if accelerator.distributed_type == DistributedType.FSDP:
        lockstep_batches = int(accelerator.gather(torch.tensor([len(loader)], device=device)).max())
    with ExitStack() as stack:
        for probe in probes:
            stack.enter_context(probe.attached())
        for index, batch in enumerate(progress):
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device) if "labels" in batch else input_ids
            for probe in probes:
                probe.start_batch(input_ids, index)
            with accelerator.autocast():
                nll = loss_module(input_ids, labels).double()
            count = objective.count_targets(labels).double()
            totals += torch.stack([nll, count, nll / count.clamp_min(1), torch.ones_like(nll)])
    if lockstep_batches > len(loader):  # after the probes detach, so they never see the uncounted batches
        filler = dataset[:1]
        input_ids = filler["input_ids"].to(device)
        labels = filler["labels"].to(device) if "labels" in filler else input_ids
        for _ in range(lockstep_batches - len(loader)):
            with accelerator.autocast():
                loss_module(input_ids, labels)
    loss_module.train(was_training)
    total_nll, tokens, batch_loss_sum, batches = accelerator.reduce(totals, "sum").tolist()
    loss = total_nll / max(tokens, 1.0)
    batch_mean_loss = batch_loss_sum / max(batches, 1.0)
    return {
        "perplexity": safe_exp(loss),
        "eval_loss": loss,
        "eval_tokens": int(tokens),
        "perplexity_mean_of_batch_losses": safe_exp(batch_mean_loss),
        "eval_loss_mean_of_batch_losses": batch_mean_loss,
    }
