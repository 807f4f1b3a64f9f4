"""The pre-training job behind `run_mlm.py` and `run_clm.py`: parse, build, train, evaluate, save.

Both scripts call `pretrain(objective, argv)`; the objective decides the model family, the sequence-length
flag and the few settings that differ. Flags keep the names and meaning of the paper's scripts, and each
script accepts only the flags it uses.
"""

from __future__ import annotations

import argparse
import logging
import math
import uuid
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from .arguments import add_group, parse_args
from .checkpoints import (
    RUN_SETTINGS,
    TrainingProgress,
    check_checkpoint_files,
    model_state_dict,
    register_model_checkpointing,
    resolve_resume,
)
from .errors import UsageError
from .evaluation import evaluate
from .families import family_of_objective
from .files import check_output_dir, save_pretrained_atomic, write_json_atomic
from .job_args import TrackingArgs, TrainingArgs
from .modalities import get_modality
from .model_loading import (
    add_model_args,
    load_model,
)
from .objectives import Objective, get_objective
from .optim import build_optimizer, build_scheduler
from .plan import resolve_training
from .resume import check_new_run_folder, resume_run
from .runtime import check_launch, print_dry_run, setup_logging
from .telemetry import Telemetry, init_tracking
from .training import EpochPermutationSampler, LoopSettings, train

logger = logging.getLogger(__name__)


def build_parser(objective: Objective) -> argparse.ArgumentParser:
    family = family_of_objective(objective.name)
    parser = argparse.ArgumentParser(
        prog=family.train_script,
        description=f"Pre-train {family.model_type.upper()} ({objective.name.upper()}) with an attention variant.",
        allow_abbrev=False,
    )
    modality = get_modality(family)
    add_model_args(parser, family.model_type, omit=modality.omitted_model_flags)
    modality.add_data_args(parser, family, training=True)
    betas = {"adam_beta1": {"default": family.adam_betas[0]}, "adam_beta2": {"default": family.adam_betas[1]}}
    add_group(parser, TrainingArgs, "training", betas, before=lambda group: objective.add_args(group, training=True))
    add_group(parser, TrackingArgs, "tracking")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    steps = args.checkpointing_steps
    if steps is not None and steps != "epoch" and (not steps.isdigit() or int(steps) <= 0):
        raise UsageError(f"--checkpointing_steps must be a positive integer or 'epoch', got {steps!r}.")
    if args.extra_tb_stats and not (args.with_tracking and args.report_to in ("tensorboard", "all")):
        raise UsageError("--extra_tb_stats logs to TensorBoard: add --with_tracking --report_to tensorboard.")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(args, flag)}.")
    for flag in ("max_train_steps", "num_warmup_steps", "num_train_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}.")
    if args.muon_learning_rate is not None and args.optimizer != "muon":
        raise UsageError("--muon_learning_rate sets Muon's rate: add --optimizer muon, or drop it.")
    if args.muon_learning_rate is not None and not args.muon_learning_rate > 0:
        raise UsageError(f"--muon_learning_rate must be positive, got {args.muon_learning_rate}.")
    if args.fine_tuning and args.model_name_or_path is None:
        raise UsageError(
            "--fine_tuning initialises gates added to a pretrained model: pass its --model_name_or_path, or drop "
            "--fine_tuning to train from scratch."
        )
    output_dir = check_output_dir(args.output_dir)
    if not args.resume_from_checkpoint and not args.dry_run:
        check_new_run_folder(output_dir)


def pretrain(objective_name: str, argv: list[str] | None = None) -> dict:
    """Run the pre-training job of `objective_name` ('mlm' or 'clm') with command-line `argv`; returns the
    figures written to `all_results.json`."""
    objective = get_objective(objective_name)
    args = parse_args(build_parser(objective), argv)
    _check_args(args)
    output_dir = Path(args.output_dir)
    checkpoint = None
    if args.resume_from_checkpoint and not args.dry_run:
        checkpoint = resolve_resume(args.resume_from_checkpoint, output_dir)
    accelerator = Accelerator(log_with=args.report_to if args.with_tracking else None, project_dir=str(output_dir))
    setup_logging(accelerator)
    check_launch(accelerator)
    if checkpoint is not None:  # before any weights or data are loaded
        check_checkpoint_files(checkpoint, accelerator.process_index)
    set_seed(args.seed)

    plan = resolve_training(args, family_of_objective(objective.name), accelerator.num_processes)
    if args.dry_run:
        return print_dry_run(accelerator, plan.to_dict())
    preprocessor, config, seq_length = plan.preprocessor, plan.config, plan.seq_length
    modality = get_modality(plan.family)
    model = load_model(plan.model, config, accelerator.device)

    splits = modality.prepare_splits(plan, accelerator, training=True)
    targets = objective.targets(preprocessor, config, args, training=True)
    eval_set = objective.evaluation_set(splits["validation"], targets, args.seed)
    sampler = EpochPermutationSampler(
        len(splits["train"]), args.seed, args.sample_with_replacement, with_seeds=modality.samples_with_seeds
    )
    # Its own generator: iterating a DataLoader must not draw from the global RNG that dropout uses.
    train_loader = DataLoader(
        splits["train"],
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        generator=torch.Generator(),
        num_workers=getattr(plan.data, "dataloader_num_workers", 0),
    )
    loss_module = objective.loss_class(model)
    optimizer = build_optimizer(
        model,
        args.learning_rate,
        args.weight_decay,
        args.wd_LN_gamma,
        (args.adam_beta1, args.adam_beta2),
        args.adam_epsilon,
        args.optimizer,
        args.muon_learning_rate,
    )
    loss_module, optimizer, train_loader = accelerator.prepare(loss_module, optimizer, train_loader)
    records = modality.records(args)
    register_model_checkpointing(accelerator, loss_module, preprocessor, records)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_train_steps = args.num_train_epochs * steps_per_epoch if args.max_train_steps is None else args.max_train_steps
    settings = vars(args) | {
        "run_id": uuid.uuid4().hex,  # which checkpoints are this run's (resumes keep it)
        "seq_length": seq_length,
        "max_train_steps": max_train_steps,
        "steps_per_epoch": steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "attention": plan.attention.to_dict(),
        "model_config": {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"},
        "train_blocks": len(splits["train"]),
        "validation_blocks": len(eval_set),
        "plan": plan.to_dict(),  # what --dry_run prints for these flags
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    progress = TrainingProgress()
    if checkpoint is not None:
        settings["run_id"] = resume_run(accelerator, checkpoint, settings, set(vars(args)), optimizer, progress)
        logger.info("Resumed at step %d of %d from %s", progress.step, max_train_steps, checkpoint)
    scheduler = build_scheduler(
        optimizer,
        args.lr_scheduler_type,
        args.num_warmup_steps,
        max_train_steps,
        args.final_lr_fraction,
        start_step=progress.step,
    )
    if accelerator.is_main_process:
        write_json_atomic(output_dir / RUN_SETTINGS, settings)

    telemetry = None
    if args.with_tracking:
        init_tracking(accelerator, args, f"{objective.name}_{args.model_type}")
        unwrapped = accelerator.unwrap_model(loss_module).model
        telemetry = Telemetry(
            accelerator,
            unwrapped,
            args.extra_tb_stats,
            args.tb_scalar_log_interval,
            args.tb_hist_log_interval,
            output_dir,
            progress.step,
        )
    loop = LoopSettings(
        max_train_steps=max_train_steps,
        steps_per_epoch=steps_per_epoch,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        grad_norm_type=args.grad_norm_type,
        seed=args.seed,
        output_dir=output_dir,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        run_settings=settings,
    )
    summary = train(
        accelerator,
        loss_module,
        optimizer,
        scheduler,
        train_loader,
        sampler,
        objective,
        targets,
        progress,
        loop,
        telemetry,
    )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    results = evaluate(
        accelerator,
        loss_module if fsdp else accelerator.unwrap_model(loss_module),
        eval_set,
        objective,
        args.per_device_eval_batch_size,
    )
    results |= summary
    logger.info("Validation: %s", ", ".join(f"{label} {results[key]:.4f}" for key, label in objective.reported))
    if args.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)}, step=progress.step)
    accelerator.wait_for_everyone()
    state_dict = model_state_dict(accelerator, loss_module)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(loss_module).model
        save_pretrained_atomic(unwrapped, preprocessor, output_dir, state_dict, records)
        write_json_atomic(output_dir / "all_results.json", results | {"settings": settings})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
