"""The pre-training loop shared by MLM and CLM.

One iteration is one optimizer step over `gradient_accumulation_steps` micro-batches. The loss of the step
is the summed NLL divided by the number of predicted tokens of the whole step on all processes, so
accumulation 2 x batch 4 equals batch 8 and the step count, schedule and checkpoints never depend on the
number of processes. Everything random is reproducible across an interruption: the data order is a
permutation seeded by (seed, epoch), training masks come from a generator seeded by (seed, step, process),
and accelerate's checkpoint restores dropout's RNG, the optimizer, the scheduler and the step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .checkpoints import TrainingProgress, checkpoint_dirs, save_checkpoint, truncate_jsonl
from .objectives import Objective, derive_seed

logger = logging.getLogger(__name__)

Targets = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class EpochPermutationSampler(Sampler[int]):
    """A fresh random order each epoch, a pure function of (seed, epoch): a resumed run sees the same order.
    With `replacement`, each epoch is as many blocks drawn uniformly at random with replacement."""

    def __init__(self, num_examples: int, seed: int, replacement: bool = False):
        self.num_examples = num_examples
        self.seed = seed
        self.replacement = replacement
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        if self.replacement:
            return iter(torch.randint(self.num_examples, (self.num_examples,), generator=generator).tolist())
        return iter(torch.randperm(self.num_examples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_examples


@dataclass
class LoopSettings:
    max_train_steps: int
    steps_per_epoch: int
    gradient_accumulation_steps: int
    max_grad_norm: float | None
    grad_norm_type: float
    seed: int
    output_dir: Path
    checkpointing_steps: str | None
    checkpoints_total_limit: int


class NonFiniteLossError(FloatingPointError):
    pass


def _due(checkpointing_steps: str | None, step: int, steps_per_epoch: int, last: bool) -> bool:
    if checkpointing_steps is None:
        return False
    if checkpointing_steps == "epoch":
        return step % steps_per_epoch == 0 or last
    return step % int(checkpointing_steps) == 0


def train(
    accelerator,
    loss_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader: DataLoader,
    sampler: EpochPermutationSampler,
    objective: Objective,
    targets: Targets,
    progress: TrainingProgress,
    settings: LoopSettings,
    telemetry=None,
) -> dict:
    """Run optimizer steps from `progress.step` to `settings.max_train_steps`; returns summary figures."""
    log_path = settings.output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(log_path, progress.step)
    log_file = open(log_path, "a") if accelerator.is_main_process else None  # noqa: SIM115 (closed below)
    parameters = [p for p in loss_module.parameters() if p.requires_grad]
    max_norm = settings.max_grad_norm if settings.max_grad_norm else float("inf")  # 0 / None: measure only
    bar = tqdm(
        total=settings.max_train_steps,
        initial=progress.step,
        disable=not accelerator.is_local_main_process,
        desc="Training",
        dynamic_ncols=True,
    )
    world = accelerator.num_processes
    loss_module.train()
    last_loss = float("nan")
    try:
        while progress.step < settings.max_train_steps:
            epoch, step_in_epoch = divmod(progress.step, settings.steps_per_epoch)
            sampler.set_epoch(epoch)
            skip = step_in_epoch * settings.gradient_accumulation_steps
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            batches = iter(loader)
            while progress.step < settings.max_train_steps:
                micro = list(islice(batches, settings.gradient_accumulation_steps))
                if not micro:
                    break
                start = time.perf_counter()
                step = progress.step + 1
                ids = torch.cat([batch["input_ids"] for batch in micro])
                generator = torch.Generator(ids.device).manual_seed(
                    derive_seed(settings.seed, step, accelerator.process_index)
                )
                inputs, labels = targets(ids, generator)
                num_targets = accelerator.reduce(objective.count_targets(labels), "sum").clamp_min(1)
                nll_sum = torch.zeros((), device=ids.device, dtype=torch.float32)
                measuring = telemetry.measure(step) if telemetry is not None else nullcontext()
                with measuring:
                    sizes = [len(batch["input_ids"]) for batch in micro]
                    chunks = list(zip(inputs.split(sizes), labels.split(sizes), strict=True))
                    for index, (chunk_inputs, chunk_labels) in enumerate(chunks):
                        sync = index == len(chunks) - 1
                        with nullcontext() if sync else accelerator.no_sync(loss_module):
                            nll = loss_module(chunk_inputs, chunk_labels)
                            # DDP averages gradients over processes; the step loss is a sum over all of them.
                            accelerator.backward(nll * (world / num_targets))
                        nll_sum += nll.detach().float()
                loss = (accelerator.reduce(nll_sum, "sum") / num_targets).item()
                if not math.isfinite(loss):
                    latest = checkpoint_dirs(settings.output_dir)
                    raise NonFiniteLossError(
                        f"Loss is {loss} at step {step}; the run stopped before updating the weights. The last good "
                        f"checkpoint is {latest[-1] if latest else 'none (no --checkpointing_steps)'}: resume from it "
                        "with a lower --learning_rate or a --max_grad_norm."
                    )
                grad_norm = accelerator.clip_grad_norm_(parameters, max_norm, norm_type=settings.grad_norm_type)
                learning_rate = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step = step
                seconds = time.perf_counter() - start
                record = {
                    "step": step,
                    "loss": loss,
                    "learning_rate": learning_rate,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": ids.numel() * world / seconds,
                }
                last_loss = loss
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if telemetry is not None:
                    telemetry.log(step, record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                last = step == settings.max_train_steps
                if _due(settings.checkpointing_steps, step, settings.steps_per_epoch, last):
                    save_checkpoint(accelerator, settings.output_dir, step, settings.checkpoints_total_limit)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return {"train_loss": last_loss, "step": progress.step, "epoch": progress.step / settings.steps_per_epoch}
