"""Resuming a run: which settings may change on resume, the check of a checkpoint's own record, and the
rule that a run never adopts another run's folder or checkpoints.

A checkpoint records the settings of the run that wrote it (run_settings.json, with the run's id). A resume
compares them with its own: the optimizer and schedule flags may change and take effect, the saving and
logging flags may change freely, and any other difference is an error naming each setting.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..errors import InputFileError, UsageError, UserError
from ..files import read_json, strict_json
from .checkpoints import RUN_SETTINGS, TRAINING_STATE, TrainingProgress, checkpoint_dirs, checkpoint_run_id

logger = logging.getLogger(__name__)

# What a resumed run may set anew. Every other setting must equal the checkpoint's record (run_settings.json in
# the checkpoint), since it shapes the model, the data or their order.
# - These take effect from the resumed step on: the optimizer's hyperparameters and the schedule (e.g. a lower
#   learning rate after a divergence). The optimizer's moments are restored, its hyperparameters are not.
ADJUSTABLE_ON_RESUME = (
    "learning_rate",
    "lr_scheduler_type",
    "num_warmup_steps",
    "final_lr_fraction",
    "max_grad_norm",
    "grad_norm_type",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)
# - These never touch the trajectory: where and how often the run saves, logs and evaluates, and caches
#   (num_train_epochs is represented by max_train_steps, the config flags by the model config, both compared).
FREE_ON_RESUME = (
    "run_id",
    "plan",  # compared through its parts (the flags, model_config, attention, seq_length)
    "config_name",  # these two are compared as the model config they resolve to (model_config)
    "config_path",
    "output_dir",
    "resume_from_checkpoint",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "num_train_epochs",
    "per_device_eval_batch_size",
    "validation_file",
    "validation_percentage",
    "validation_blocks",
    "with_tracking",
    "report_to",
    "extra_tb_stats",
    "tb_scalar_log_interval",
    "tb_hist_log_interval",
    "preprocessing_num_workers",
    "overwrite_cache",
    "data_cache_dir",
    "model_cache_dir",
    "low_cpu_mem_usage",
    "dry_run",
    "transformers_version",
    "torch_version",
)
RUN_LOCK = "run.lock"  # held (flock) by the live run, new or resumed, for as long as it runs
# What in a folder marks a run: a new run there would adopt, rotate away or overwrite it.
RUN_FILES = (RUN_SETTINGS, "train_log.jsonl", "all_results.json", "config.json")


def check_new_run_folder(output_dir: Path) -> None:
    """A new run starts only in a folder that holds no run: it would adopt, rotate away or overwrite it."""
    found = (
        sorted(p.name for p in output_dir.iterdir() if p.name in RUN_FILES or p.name.startswith("step_"))
        if output_dir.is_dir()
        else []
    )
    if found:
        raise UsageError(
            f"--output_dir {output_dir} already holds a run ({', '.join(found[:6])}); pass a new --output_dir, or "
            "--resume_from_checkpoint latest to continue that run."
        )


@contextmanager
def hold_run_folder(output_dir: Path) -> Iterator[None]:
    """Hold `output_dir`'s run lock while the run lives, so a second process started into the same folder (a new
    run beside a starting one, or a resume beside a live one) is refused before it loads anything. An advisory
    lock of the open file: the kernel drops it when the process ends however it ends, so a killed run leaves no
    lock behind (only the unlocked file); a run that ends removes the file while it still holds it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RUN_LOCK
    while True:
        lock = open(path, "a+")  # noqa: SIM115 (held open for the run, closed below)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(
                f"--output_dir {output_dir} is in use by a live run ({holder}); wait for it to end or stop it, "
                "or pass a new --output_dir."
            ) from None
        try:  # the file a run that just ended removed is not the folder's lock any more: take the new one
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()


@contextmanager
def take_run_folder(output_dir: Path, new_run: bool, accelerator: Accelerator) -> Iterator[None]:
    """Every process of a run holds `output_dir` or refuses it together. The main process takes the lock (a new run
    checks the folder again under it: a run may have recorded itself there since the first check) and the others
    learn its verdict in one broadcast, so a refusal is the same one line from every process, not one line and a
    failed collective in the others."""
    with ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(hold_run_folder(output_dir))
                if new_run:
                    check_new_run_folder(output_dir)
            except UsageError as error:
                refusal = str(error)
        if accelerator.num_processes > 1:
            verdict = [refusal]
            broadcast_object_list(verdict, from_process=0)  # also the barrier before anything loads
            refusal = verdict[0]
        if refusal is not None:
            raise UsageError(refusal)
        yield


def _difference(key: str, saved, now, flags: set[str]) -> str:
    """One differing setting; for a mapping (the model config, the attention method) only the fields that differ."""
    name = f"{'--' * (key in flags)}{key}"
    if isinstance(saved, dict) and isinstance(now, dict):
        fields = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        return f"{name}: " + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in fields)
    return f"{name}: checkpoint {saved!r}, now {now!r}"


def resume_run(
    accelerator, checkpoint: Path, settings: dict, flags: set[str], optimizer, progress: TrainingProgress
) -> str:
    """Load a checkpoint of the run that `settings` continues: the settings it records must match (but for the
    adjustable and free ones), the output folder must hold no other run's checkpoints, and the optimizer keeps
    this run's hyperparameters. Returns the run id to continue."""
    fix = "resume from a checkpoint written by this version"
    saved = read_json(checkpoint / RUN_SETTINGS, "the settings of the run that wrote it", fix)
    if "run_id" not in saved:
        raise InputFileError(f"{checkpoint / RUN_SETTINGS} names no run_id; {fix}.")
    now = json.loads(strict_json(settings))  # as the record holds them
    exempt = {*ADJUSTABLE_ON_RESUME, *FREE_ON_RESUME}
    fixed = [key for key in sorted(set(saved) | set(now)) if key not in exempt and saved.get(key) != now.get(key)]
    if fixed:
        listing = "; ".join(_difference(key, saved.get(key), now.get(key), flags) for key in fixed)
        raise UsageError(
            f"{checkpoint} was written with other settings that cannot change on resume ({listing}); resume with "
            "the checkpoint's values, or start a new run in a new --output_dir."
        )
    changed = [key for key in ADJUSTABLE_ON_RESUME if saved.get(key) != now.get(key)]
    if changed:
        logger.info(
            "Resuming with new %s (they take effect from step %s on)",
            ", ".join(f"--{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in changed),
            checkpoint.name.removeprefix("step_"),
        )
    others = [p.name for p in checkpoint_dirs(settings["output_dir"]) if checkpoint_run_id(p) != saved["run_id"]]
    if others:
        raise UsageError(
            f"--output_dir {settings['output_dir']} holds checkpoints of another run ({', '.join(others)}); resume "
            "into that run's own folder or into a new --output_dir."
        )
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        accelerator.load_state(str(checkpoint))
    except UserError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UsageError(
            f"{checkpoint} is corrupt or does not match this run's model or optimizer ({error}); resume from "
            "another checkpoint, or with the settings that wrote it."
        ) from error
    for group, values in zip(optimizer.param_groups, hyperparameters, strict=True):
        params = group["params"]
        group.clear()
        group.update(values, params=params)
    progress.load_state_dict(read_json(checkpoint / TRAINING_STATE, "the step and loss", fix))
    if progress.step > settings["max_train_steps"]:
        raise UsageError(
            f"{checkpoint} is at step {progress.step}, past --max_train_steps {settings['max_train_steps']}."
        )
    return saved["run_id"]
