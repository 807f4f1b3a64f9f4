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

from .arguments import parse_args
from .block_layouts import layout_record
from .checkpoints import (
    RUN_SETTINGS,
    TrainingProgress,
    check_checkpoint_files,
    model_state_dict,
    register_model_checkpointing,
    resolve_resume,
)
from .data import add_data_args, prepare_splits
from .errors import UsageError
from .evaluation import evaluate_perplexity
from .families import family_of_objective
from .files import check_output_dir, save_pretrained_atomic, write_json_atomic
from .model_loading import (
    add_model_args,
    load_model,
)
from .objectives import Objective, get_objective
from .optim import SCHEDULES, build_optimizer, build_scheduler
from .plan import resolve_training
from .resume import check_new_run_folder, resume_run
from .runtime import check_launch, print_dry_run, setup_logging
from .telemetry import Telemetry, init_tracking
from .training import EpochPermutationSampler, LoopSettings, train

logger = logging.getLogger(__name__)


def build_parser(objective: Objective) -> argparse.ArgumentParser:
    family = family_of_objective(objective.name)
    parser = argparse.ArgumentParser(
        prog=f"run_{objective.name}.py",
        description=f"Pre-train {family.model_type.upper()} ({objective.name.upper()}) with an attention variant.",
        allow_abbrev=False,
    )
    add_model_args(parser, family.model_type)
    add_data_args(parser, family.sequence)
    group = parser.add_argument_group("training")
    objective.add_args(group)
    group.add_argument("--seed", type=int, default=42, help="Seed of init, data order, masks and dropout.")
    group.add_argument(
        "--per_device_train_batch_size", type=int, default=8, help="Sequences per micro-batch and process."
    )
    group.add_argument("--per_device_eval_batch_size", type=int, default=8, help="Sequences per evaluation batch.")
    group.add_argument(
        "--sample_with_replacement",
        action="store_true",
        help="Draw training blocks uniformly at random with replacement (default: a fresh permutation each epoch).",
    )
    group.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate.")
    group.add_argument("--lr_scheduler_type", default="linear", choices=SCHEDULES, help="Schedule after warmup.")
    group.add_argument("--num_train_epochs", type=int, default=3, help="Epochs (when --max_train_steps is not set).")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
    group.add_argument("--num_warmup_steps", type=int, default=0, help="Linear warmup steps.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    group.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay (never on biases, gates).")
    group.add_argument("--wd_LN_gamma", action="store_true", help="Also decay LayerNorm weights (gamma).")
    group.add_argument(
        "--final_lr_fraction", type=float, default=0.0, help="LR at max_train_steps as a fraction of the peak."
    )
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: no clipping).")
    group.add_argument("--grad_norm_type", type=float, default=2.0, help="Norm type of the clipping (inf allowed).")
    group.add_argument("--adam_beta1", type=float, default=family.adam_betas[0], help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=float, default=family.adam_betas[1], help="AdamW beta2 (OPT: 0.95).")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    group.add_argument("--output_dir", required=True, help="Where checkpoints, the model and results go.")
    group.add_argument("--checkpointing_steps", default=None, help="Save a checkpoint every N steps, or 'epoch'.")
    group.add_argument("--checkpoints_total_limit", type=int, default=3, help="Checkpoints kept (newest).")
    group.add_argument("--resume_from_checkpoint", default=None, help="A step_N checkpoint directory or 'latest'.")
    group.add_argument(
        "--dry_run",
        action="store_true",
        help="Resolve the flags, model config and method, print them as JSON and exit (no data, no weights).",
    )
    group = parser.add_argument_group("tracking")
    group.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    group.add_argument("--report_to", default="tensorboard", help="accelerate tracker name(s), or 'all'.")
    group.add_argument(
        "--extra_tb_stats",
        action="store_true",
        help="Log weight / activation inf-norms, kurtosis, first-token attention and gates (also to growth.jsonl).",
    )
    group.add_argument("--tb_scalar_log_interval", type=int, default=100, help="Steps between extra statistics.")
    group.add_argument("--tb_hist_log_interval", type=int, default=1000, help="Steps between histograms.")
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
    tokenizer, config, seq_length = plan.tokenizer, plan.config, plan.seq_length
    model = load_model(plan.model, config, accelerator.device)

    splits = prepare_splits(plan.data, plan.splits, tokenizer, seq_length, accelerator)
    targets = objective.targets(tokenizer, args)
    eval_set = objective.evaluation_set(splits["validation"], targets, args.seed)
    sampler = EpochPermutationSampler(len(splits["train"]), args.seed, args.sample_with_replacement)
    # Its own generator: iterating a DataLoader must not draw from the global RNG that dropout uses.
    train_loader = DataLoader(
        splits["train"], batch_size=args.per_device_train_batch_size, sampler=sampler, generator=torch.Generator()
    )
    loss_module = objective.loss_class(model)
    optimizer = build_optimizer(
        model,
        args.learning_rate,
        args.weight_decay,
        args.wd_LN_gamma,
        (args.adam_beta1, args.adam_beta2),
        args.adam_epsilon,
    )
    loss_module, optimizer, train_loader = accelerator.prepare(loss_module, optimizer, train_loader)
    records = layout_record(args.block_layout)
    register_model_checkpointing(accelerator, loss_module, tokenizer, records)
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
    results = evaluate_perplexity(
        accelerator,
        loss_module if fsdp else accelerator.unwrap_model(loss_module),
        eval_set,
        objective,
        args.per_device_eval_batch_size,
    )
    results |= summary
    logger.info(
        "Validation perplexity %.4f (loss %.4f over %d tokens)",
        results["perplexity"],
        results["eval_loss"],
        results["eval_tokens"],
    )
    if args.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)}, step=progress.step)
    accelerator.wait_for_everyone()
    state_dict = model_state_dict(accelerator, loss_module)
    if accelerator.is_main_process:
        save_pretrained_atomic(accelerator.unwrap_model(loss_module).model, tokenizer, output_dir, state_dict, records)
        write_json_atomic(output_dir / "all_results.json", results | {"settings": settings})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
