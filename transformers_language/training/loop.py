"""The training loop shared by every objective (MLM, CLM, image classification).

One iteration is one optimizer step over `gradient_accumulation_steps` micro-batches. The loss of the step
is the summed NLL divided by the number of predicted tokens of the whole step on all processes, so
accumulation 2 x batch 4 equals batch 8 and the step count, schedule and checkpoints never depend on the
number of processes. Everything random is reproducible across an interruption: the data order is a
permutation seeded by (seed, epoch), training masks come from a generator seeded by (seed, step, process),
accelerate's checkpoint restores dropout's RNG and the optimizer's moments, and the step (JSON) fixes the
epoch, the position in it and the learning rate. A step whose loss or gradient norm is not finite stops the
run before it changes a weight, so every checkpoint holds finite weights (under fp16 an infinite gradient is
the loss scaler's overflow signal instead: the scaler skips that update).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from quantization.token_mask import real_tokens

from ..errors import UserError
from ..files import strict_json, truncate_jsonl
from ..objectives import Objective, Targets, derive_seed
from ..objectives.inputs import attention_mask, concat_batches, split_inputs
from ..runtime import progress_bar
from .checkpoints import (
    RUN_SETTINGS,
    TRAINING_STATE,
    TrainingProgress,
    checkpoint_dirs,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


class EpochPermutationSampler(Sampler[int]):
    """A fresh random order each epoch, a pure function of (seed, epoch): a resumed run sees the same order.
    With `replacement`, each epoch is as many blocks drawn uniformly at random with replacement. With
    `with_seeds`, it yields (index, seed of that draw) pairs, the seed a function of (seed, epoch, position), for
    datasets that augment each example under its own seed (image_data.SeededImages)."""

    def __init__(self, num_examples: int, seed: int, replacement: bool = False, with_seeds: bool = False):
        self.num_examples = num_examples
        self.seed = seed
        self.replacement = replacement
        self.with_seeds = with_seeds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        if self.replacement:
            order = torch.randint(self.num_examples, (self.num_examples,), generator=generator).tolist()
        else:
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        if self.with_seeds:
            return iter((index, derive_seed(self.seed, self.epoch, position)) for position, index in enumerate(order))
        return iter(order)

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
    run_settings: dict  # recorded in each checkpoint: what a resume is checked against


class NonFiniteLossError(UserError, FloatingPointError):
    """A step whose loss or gradient norm is not finite: the run stops before the step changes any weight."""


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
    compiled_loss: torch.nn.Module | None = None,
) -> dict:
    """Run optimizer steps from `progress.step` to `settings.max_train_steps`; returns summary figures.

    `compiled_loss` (torch.compile of `loss_module`, sharing its weights) runs every step whose statistics are
    not measured; a measured step runs `loss_module` eagerly, so every telemetry hook fires."""
    log_path = settings.output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(log_path, progress.step)
    log_file = open(log_path, "a") if accelerator.is_main_process else None  # noqa: SIM115 (closed below)
    parameters = [p for p in loss_module.parameters() if p.requires_grad]
    max_norm = settings.max_grad_norm if settings.max_grad_norm else float("inf")  # 0 / None: measure only
    bar = progress_bar(accelerator, total=settings.max_train_steps, initial=progress.step, desc="Training")
    world = accelerator.num_processes
    loss_module.train()
    run_id = settings.run_settings["run_id"]
    try:
        while progress.step < settings.max_train_steps:
            epoch, step_in_epoch = divmod(progress.step, settings.steps_per_epoch)
            # The prepared loader owns the epoch: each iteration it sets its sampler's epoch from its own counter
            # (0 in a fresh process), and skip_first_batches copies that counter.
            train_loader.set_epoch(epoch)
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
                batch = concat_batches(micro)
                device = batch[objective.input_key].device
                generator = torch.Generator(device).manual_seed(
                    derive_seed(settings.seed, step, accelerator.process_index)
                )
                inputs, labels = targets(batch, generator)
                num_targets = accelerator.reduce(objective.count_targets(labels), "sum").clamp_min(1)
                nll_sum = torch.zeros((), device=device, dtype=torch.float32)
                measured = telemetry is not None and telemetry.measures(step)
                forward = loss_module if compiled_loss is None or measured else compiled_loss
                measuring = telemetry.measure(step) if measured else nullcontext()
                with measuring:
                    sizes = [len(part[objective.input_key]) for part in micro]
                    chunks = list(zip(split_inputs(inputs, sizes), labels.split(sizes), strict=True))
                    for index, (chunk_inputs, chunk_labels) in enumerate(chunks):
                        sync = index == len(chunks) - 1
                        with nullcontext() if sync else accelerator.no_sync(loss_module):
                            with real_tokens(attention_mask(chunk_inputs)):  # for the telemetry's statistics
                                nll = forward(chunk_inputs, chunk_labels)
                            # DDP averages gradients over processes; the step loss is a sum over all of them.
                            accelerator.backward(nll * (world / num_targets))
                        nll_sum += nll.detach().float()
                loss = (accelerator.reduce(nll_sum, "sum") / num_targets).item()
                if not math.isfinite(loss):
                    raise NonFiniteLossError(_non_finite_message(f"Loss is {loss}", step, settings, run_id))
                # The norm of the synchronised gradients: the same on every process, so all stop together.
                grad_norm = accelerator.clip_grad_norm_(parameters, max_norm, norm_type=settings.grad_norm_type)
                # Under fp16 the loss scaler expects overflows: it skips that step's update and lowers its scale.
                if not math.isfinite(float(grad_norm)) and accelerator.scaler is None:
                    message = f"The gradient norm is {float(grad_norm)} (loss {loss:.4f})"
                    raise NonFiniteLossError(_non_finite_message(message, step, settings, run_id))
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
                    objective.throughput: objective.work(inputs) * world / seconds,
                }
                progress.loss = loss
                if log_file is not None:
                    log_file.write(strict_json(record) + "\n")
                    log_file.flush()
                if telemetry is not None:
                    telemetry.log(step, record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", per_s=f"{record[objective.throughput]:.0f}")
                last = step == settings.max_train_steps
                if _due(settings.checkpointing_steps, step, settings.steps_per_epoch, last):
                    records = {TRAINING_STATE: progress.state_dict(), RUN_SETTINGS: settings.run_settings}
                    save_checkpoint(
                        accelerator, settings.output_dir, step, settings.checkpoints_total_limit, records, run_id
                    )
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    # A run resumed at its last step trains nothing: its loss is the checkpoint's.
    return {"train_loss": progress.loss, "step": progress.step, "epoch": progress.step / settings.steps_per_epoch}


def _non_finite_message(problem: str, step: int, settings: LoopSettings, run_id: str) -> str:
    """What stopped the run, the checkpoint to go back to (a checkpoint is written only after finite steps) and
    a remedy that works (the learning rate and clipping may change on resume)."""
    latest = checkpoint_dirs(settings.output_dir, run_id)
    remedy = "a lower --learning_rate or a smaller --max_grad_norm (both take effect on resume)"
    if latest:
        where = f"The last checkpoint is finite: resume with --resume_from_checkpoint {latest[-1]} and {remedy}."
    elif settings.checkpointing_steps is None:
        where = f"There is no checkpoint (no --checkpointing_steps): start again in a new --output_dir with {remedy}."
    else:
        where = (
            f"No checkpoint was due yet (--checkpointing_steps {settings.checkpointing_steps}): start again in a new "
            f"--output_dir with {remedy}."
        )
    return f"{problem} at step {step}; the run stopped before the step changed any weight. {where}"
