"""The job flags as typed argument groups, each flag with its range check: training and tracking (run_*.py),
evaluation (validate_*.py); and the parser frame every job shares. The model, attention, data, objective and
W8A8 groups live with what they configure (models/loading.py, models/attention_config.py, data/text.py and
data/images.py, the objectives, ptq/quant_args.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..arguments import (
    FINITE_NON_NEGATIVE,
    FINITE_POSITIVE,
    NON_NEGATIVE,
    OPEN_UNIT_INTERVAL,
    POSITIVE,
    UNIT_INTERVAL,
    Check,
    FlagParser,
    add_group,
    arg,
)
from ..data.modalities import get_modality
from ..errors import UsageError
from ..evaluation.outlier_report import TOP_K
from ..families import Family
from ..models.loading import add_model_args
from ..training.optim import OPTIMIZERS, SCHEDULES

CHECKPOINT_EVERY = Check("be a positive integer or 'epoch'", lambda v: v == "epoch" or (v.isdigit() and int(v) > 0))


MIXED_PRECISIONS = ("no", "bf16", "fp16")
_PRECISION_DEFAULT = "Default: the accelerate config's, or ACCELERATE_MIXED_PRECISION."


def mixed_precision_flag(help: str):
    """The `--mixed_precision` field of a job's group, with that job's meaning of it."""
    return arg(None, f"{help} {_PRECISION_DEFAULT}", choices=MIXED_PRECISIONS)


def torch_compile_flag(help: str):
    """The `--torch_compile` switch of a job's group, with that job's meaning of it."""
    return arg(False, help, action="store_true")


@dataclass(frozen=True)
class TrainingArgs:
    """How a pre-training run trains, where it writes, and how it resumes."""

    seed: int = arg(42, "Seed of init, data order, masks and dropout.", type=int)
    per_device_train_batch_size: int = arg(8, "Sequences per micro-batch and process.", POSITIVE, type=int)
    per_device_eval_batch_size: int = arg(8, "Sequences per evaluation batch.", POSITIVE, type=int)
    sample_with_replacement: bool = arg(
        False,
        "Draw training blocks uniformly at random with replacement (default: a fresh permutation each epoch).",
        action="store_true",
    )
    learning_rate: float = arg(5e-5, "Peak learning rate.", FINITE_NON_NEGATIVE, type=float)
    lr_scheduler_type: str = arg("linear", "Schedule after warmup.", choices=SCHEDULES)
    num_train_epochs: int = arg(3, "Epochs (when --max_train_steps is not set).", NON_NEGATIVE, type=int)
    max_train_steps: int | None = arg(None, "Optimizer steps (overrides epochs).", NON_NEGATIVE, type=int)
    num_warmup_steps: int = arg(0, "Linear warmup steps.", NON_NEGATIVE, type=int)
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.", POSITIVE, type=int)
    optimizer: str = arg(
        "adamw", "adamw, or muon: Muon for the layers' hidden matrices, AdamW for the rest.", choices=OPTIMIZERS
    )
    muon_learning_rate: float | None = arg(
        None,
        "Muon's peak learning rate (default: --learning_rate; its update RMS matches AdamW's).",
        FINITE_POSITIVE,
        type=float,
    )
    weight_decay: float = arg(
        0.0, "Decoupled weight decay (never on biases, norms, gates).", FINITE_NON_NEGATIVE, type=float
    )
    wd_LN_gamma: bool = arg(False, "Also decay LayerNorm weights (gamma).", action="store_true")
    final_lr_fraction: float = arg(0.0, "LR at max_train_steps as a fraction of the peak.", UNIT_INTERVAL, type=float)
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0: no clipping).", FINITE_NON_NEGATIVE, type=float)
    grad_norm_type: float = arg(2.0, "Norm type of the clipping (inf allowed).", POSITIVE, type=float)
    adam_beta1: float = arg(0.9, "AdamW beta1.", OPEN_UNIT_INTERVAL, type=float)
    adam_beta2: float = arg(0.999, "AdamW beta2 (OPT: 0.95).", OPEN_UNIT_INTERVAL, type=float)
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.", FINITE_POSITIVE, type=float)
    mixed_precision: str | None = mixed_precision_flag(
        "bf16: bf16 autocast with fp32 master weights and optimizer state (CPUs with AVX512-BF16 or AMX, GPUs); "
        "fp16 (GPUs, with a loss scaler); no: fp32."
    )
    torch_compile: bool = torch_compile_flag(
        "Compile the loss module's forward and backward with torch.compile (inductor); steps that log "
        "statistics (--extra_tb_stats) run eagerly, as compiled code does not see hooks added after tracing."
    )
    output_dir: str = arg(None, "Where checkpoints, the model and results go.", required=True)
    checkpointing_steps: str | None = arg(None, "Save a checkpoint every N steps, or 'epoch'.", CHECKPOINT_EVERY)
    checkpoints_total_limit: int = arg(3, "Checkpoints kept (newest).", POSITIVE, type=int)
    resume_from_checkpoint: str | None = arg(None, "A step_N checkpoint directory or 'latest'.")
    dry_run: bool = arg(
        False,
        "Resolve the flags, model config and method, print them as JSON and exit (no data, no weights).",
        action="store_true",
    )

    def __post_init__(self):
        if self.muon_learning_rate is not None and self.optimizer != "muon":
            raise UsageError("--muon_learning_rate sets Muon's rate: add --optimizer muon, or drop it.")


@dataclass(frozen=True)
class TrackingArgs:
    """What a pre-training run logs, and how often."""

    with_tracking: bool = arg(False, "Log to the trackers of --report_to.", action="store_true")
    report_to: str = arg("tensorboard", "accelerate tracker name(s), or 'all'.")
    extra_tb_stats: bool = arg(
        False,
        "Log weight / activation inf-norms, kurtosis, first-token attention and gates (also to growth.jsonl).",
        action="store_true",
    )
    tb_scalar_log_interval: int = arg(100, "Steps between extra statistics.", POSITIVE, type=int)
    tb_hist_log_interval: int = arg(1000, "Steps between histograms.", POSITIVE, type=int)

    def __post_init__(self):
        if self.extra_tb_stats and not (self.with_tracking and self.report_to in ("tensorboard", "all")):
            raise UsageError("--extra_tb_stats logs to TensorBoard: add --with_tracking --report_to tensorboard.")


@dataclass(frozen=True)
class EvaluationArgs:
    """What an evaluation measures and where it writes."""

    seed: int = arg(42, "Seed of the evaluation masks (MLM).", type=int)
    per_device_eval_batch_size: int = arg(8, "Sequences per batch.", POSITIVE, type=int)
    mixed_precision: str | None = mixed_precision_flag(
        "bf16 / fp16: the FP evaluation runs under autocast; the W8A8 simulation (--quantize) always runs in fp32."
    )
    torch_compile: bool = torch_compile_flag(
        "Run the zero-out intervention's passes (--zero_out_top_k) compiled with torch.compile (inductor); the "
        "statistics pass stays eager (its hooks would recompile the model every batch), as does W8A8 (--quantize)."
    )
    output_dir: str = arg(None, "Where all_results.json (and the plots) go.", required=True)
    kurtosis_max_batches: int | None = arg(
        None, "Kurtosis over the first N batches of each process only (default: all batches).", POSITIVE, type=int
    )
    outlier_top_k: int = arg(TOP_K, "Dimensions and tokens listed per tensor.", POSITIVE, type=int)
    zero_out_top_k: int = arg(
        0,
        "The zero-out intervention (Sun et al.): set the K (position, channel) entries of largest mean |x| in the "
        "massive-activation layer's output to zero, then to their mean, and re-measure (2 more passes; 0: off).",
        NON_NEGATIVE,
        type=int,
    )
    plot: bool = arg(False, "Also write PNG plots of the figures to --output_dir.", action="store_true")
    dry_run: bool = arg(
        False,
        "Check the flags against the checkpoint's config, print the resolved settings as JSON and exit.",
        action="store_true",
    )


def job_parser(family: Family, objective, training: bool, description: str) -> FlagParser:
    """The flags every job of `family` takes: model and attention, its modality's data flags, and the objective's
    own flags (training: `family.train_script`'s; else `family.validate_script`'s). The job adds its own groups."""
    parser = FlagParser(
        prog=family.train_script if training else family.validate_script,
        description=description,
        allow_abbrev=False,
    )
    modality = get_modality(family)
    add_model_args(parser, family.model_type, training=training, omit=modality.omitted_model_flags)
    # Validation: training data only calibrates --quantize; a text model's layout defaults to the checkpoint's.
    modality.add_data_args(parser, family, training=training)
    objective_flags = objective.flags_class(training=training)
    if objective_flags is not None:
        add_group(parser, "objective", objective_flags, "objective")
    return parser
