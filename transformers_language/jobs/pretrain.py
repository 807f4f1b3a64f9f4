"""The training job behind `run_mlm.py`, `run_clm.py`, `run_vit.py` and `run_glue.py` (fine-tuning): parse, build,
train, evaluate, save.

Every script calls `pretrain(objective, argv)`; the objective decides the model family, the sequence-length
flag and the few settings that differ. Flags keep the names and meaning of the paper's scripts, and each
script accepts only the flags it uses.
"""

from __future__ import annotations

import logging
import math
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from ..arguments import FlagParser, Flags, add_group
from ..data.modalities import get_modality
from ..evaluation.loop import evaluate
from ..families import Family, job_family
from ..files import check_output_dir, save_pretrained_atomic, write_json_atomic
from ..models.loading import load_model
from ..objectives import Objective, get_objective
from ..runtime import (
    CompiledModule,
    check_launch,
    end_processes,
    print_dry_run,
    reproducible_compilation,
    setup_logging,
    start_accelerator,
)
from ..training.checkpoints import (
    RUN_SETTINGS,
    TrainingProgress,
    check_checkpoint_files,
    model_state_dict,
    register_model_checkpointing,
    resolve_resume,
)
from ..training.loop import EpochPermutationSampler, LoopSettings, train
from ..training.optim import build_optimizer, build_scheduler
from ..training.resume import check_new_run_folder, resume_run, take_run_folder
from ..training.telemetry import Telemetry, init_tracking
from .job_args import TrackingArgs, TrainingArgs, job_parser
from .plan import resolve_training

logger = logging.getLogger(__name__)


def build_parser(objective: Objective, family: Family | None = None) -> FlagParser:
    family = family or job_family(objective.name)
    parser = job_parser(
        family,
        objective,
        training=True,
        description=f"{family.train_verb} {family.model_type.upper()} ({objective.name.upper()}) with an attention "
        "variant.",
    )
    betas = {"adam_beta1": {"default": family.adam_betas[0]}, "adam_beta2": {"default": family.adam_betas[1]}}
    add_group(parser, "training", TrainingArgs, "training", betas)
    add_group(parser, "tracking", TrackingArgs, "tracking")
    return parser


def pretrain(objective_name: str, argv: list[str] | None = None, family_name: str | None = None) -> dict:
    """Run the training job of `objective_name` ('mlm', 'clm', 'glue', 'image_classification') for `family_name`
    (default: the objective's first family, families.py) with command-line `argv`; returns the figures written
    to `all_results.json`."""
    objective = get_objective(objective_name)
    family = job_family(objective_name, family_name)
    flags = build_parser(objective, family).parse(argv)
    training, tracking = flags.training, flags.tracking
    output_dir = check_output_dir(training.output_dir)
    new_run = not training.resume_from_checkpoint and not training.dry_run
    if new_run:
        check_new_run_folder(output_dir)
    checkpoint = None
    if training.resume_from_checkpoint and not training.dry_run:
        checkpoint = resolve_resume(training.resume_from_checkpoint, output_dir)
    log_with = tracking.report_to if tracking.with_tracking else None
    accelerator = start_accelerator(training.mixed_precision, log_with=log_with, project_dir=str(output_dir))
    setup_logging(accelerator)
    check_launch(accelerator)
    # One live run per folder, new or resumed (a dry run writes nothing).
    with nullcontext() if training.dry_run else take_run_folder(output_dir, new_run, accelerator):
        results = _train(objective, family, flags, accelerator, output_dir, checkpoint)
    end_processes(accelerator)  # once the run's objects are gone
    return results


def _train(
    objective: Objective, family: Family, flags: Flags, accelerator: Accelerator, output_dir: Path, checkpoint
) -> dict:
    """The run itself, once it holds its folder (new, or resumed from `checkpoint`)."""
    training, tracking = flags.training, flags.tracking
    if checkpoint is not None:  # before any weights or data are loaded
        check_checkpoint_files(checkpoint, accelerator.process_index)
    set_seed(training.seed)

    plan = resolve_training(flags, family, accelerator.num_processes)
    if training.dry_run:
        return print_dry_run(accelerator, plan.to_dict())
    objective = objective.bound(plan.config)
    preprocessor, config, seq_length = plan.preprocessor, plan.config, plan.seq_length
    modality = get_modality(plan.family)
    model = load_model(plan.model, config, accelerator.device, plan.family.name)

    splits = modality.prepare_splits(plan, accelerator, training=True)
    targets = objective.targets(preprocessor, config, flags.get("objective"), training=True)
    eval_set = objective.evaluation_set(splits["validation"], targets, training.seed)
    sampler = EpochPermutationSampler(
        len(splits["train"]), training.seed, training.sample_with_replacement, with_seeds=modality.samples_with_seeds
    )
    # Its own generator: iterating a DataLoader must not draw from the global RNG that dropout uses.
    train_loader = DataLoader(
        splits["train"],
        batch_size=training.per_device_train_batch_size,
        sampler=sampler,
        generator=torch.Generator(),
        num_workers=getattr(plan.data, "dataloader_num_workers", 0),
        collate_fn=objective.collate,
    )
    loss_module = objective.loss_class(model)
    optimizer = build_optimizer(
        model,
        training.learning_rate,
        training.weight_decay,
        training.wd_LN_gamma,
        (training.adam_beta1, training.adam_beta2),
        training.adam_epsilon,
        training.optimizer,
        training.muon_learning_rate,
    )
    loss_module, optimizer, train_loader = accelerator.prepare(loss_module, optimizer, train_loader)
    records = modality.records(plan.data)
    register_model_checkpointing(accelerator, loss_module, preprocessor, records)
    steps_per_epoch = math.ceil(len(train_loader) / training.gradient_accumulation_steps)
    max_train_steps = training.max_train_steps
    if max_train_steps is None:
        max_train_steps = training.num_train_epochs * steps_per_epoch
    settings = plan.settings | {
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
        settings["run_id"] = resume_run(accelerator, checkpoint, settings, set(flags.values), optimizer, progress)
        logger.info("Resumed at step %d of %d from %s", progress.step, max_train_steps, checkpoint)
    scheduler = build_scheduler(
        optimizer,
        training.lr_scheduler_type,
        training.num_warmup_steps,
        max_train_steps,
        training.final_lr_fraction,
        start_step=progress.step,
    )
    if accelerator.is_main_process:
        write_json_atomic(output_dir / RUN_SETTINGS, settings)

    telemetry = None
    if tracking.with_tracking:
        init_tracking(accelerator, plan.settings, f"{objective.name}_{plan.family.model_type}")
        unwrapped = accelerator.unwrap_model(loss_module).model
        telemetry = Telemetry(
            accelerator,
            unwrapped,
            tracking.extra_tb_stats,
            tracking.tb_scalar_log_interval,
            tracking.tb_hist_log_interval,
            output_dir,
            progress.step,
        )
    loop = LoopSettings(
        max_train_steps=max_train_steps,
        steps_per_epoch=steps_per_epoch,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_grad_norm=training.max_grad_norm,
        grad_norm_type=training.grad_norm_type,
        seed=training.seed,
        output_dir=output_dir,
        checkpointing_steps=training.checkpointing_steps,
        checkpoints_total_limit=training.checkpoints_total_limit,
        run_settings=settings,
    )
    compiled_loss = CompiledModule(loss_module) if training.torch_compile else None
    if compiled_loss is not None and tracking.with_tracking and tracking.extra_tb_stats:
        logger.info(
            "--torch_compile: the steps that log statistics (every %d) run eagerly, so every hook is seen",
            tracking.tb_scalar_log_interval,
        )
    with reproducible_compilation() if compiled_loss is not None else nullcontext():
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
            compiled_loss,
        )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    results = evaluate(
        accelerator,
        loss_module if fsdp else accelerator.unwrap_model(loss_module),
        eval_set,
        objective,
        training.per_device_eval_batch_size,
    )
    results |= summary
    logger.info("Validation: %s", ", ".join(f"{label} {results[key]:.4f}" for key, label in objective.reported))
    if tracking.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)}, step=progress.step)
    accelerator.wait_for_everyone()
    state_dict = model_state_dict(accelerator, loss_module)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(loss_module).model
        save_pretrained_atomic(unwrapped, preprocessor, output_dir, state_dict, records)
        write_json_atomic(output_dir / "all_results.json", results | {"settings": settings})
    return results
