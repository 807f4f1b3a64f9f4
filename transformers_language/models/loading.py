"""Tokenizer, model config and model for a run: from scratch (config + YAML overrides) or from a checkpoint.

A from-scratch model takes its vocabulary size and special-token ids from the tokenizer. A checkpoint keeps
every pretrained weight; gates requested by the method flags are added (and initialised) on top. The
attention method comes from the flags, or from the checkpoint / YAML when no method flag is given; both at
once must agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ..arguments import FlagParser, add_group, arg
from ..errors import InputFileError, UsageError
from ..families import FAMILIES, get_family
from .attention_config import CONFIG_KEY, add_attention_args
from .model_classes import EXTRA_CONFIG_KEYS, family_of_config, model_class
from .norm_sites import CONFIG_KEY as TRANSFORMS_KEY

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArgs:
    """The model flags: which family, where the config, the weights and the tokenizer come from, dropout, and
    how the model is placed in memory. (The attention method has its own group, attention_config.py.)"""

    model_type: str = arg(None, "Model family.")
    config_name: str | None = arg(help="HF config name or path to start from.")
    config_path: str | None = arg(help="YAML file of config overrides (e.g. model_configs/opt-small.yaml).")
    model_name_or_path: str | None = arg(help="Checkpoint (hub name or directory) to continue from or fine-tune.")
    tokenizer_name: str | None = arg(help="Tokenizer name or path (default: the checkpoint's).")
    image_processor_name: str | None = arg(
        help="Image processor name or path: its mean and std normalise the pixels (default: the checkpoint's, else "
        "ViT's 0.5 / 0.5)."
    )
    model_cache_dir: str | None = arg(help="Cache directory of hub models and tokenizers.")
    attn_dropout: float | None = arg(help="Attention-probability dropout.", type=float)
    hidden_dropout: float | None = arg(help="Hidden-state dropout.", type=float)
    low_cpu_mem_usage: bool = arg(
        False,
        "Build or load the model directly on the accelerator, never holding a full copy in CPU memory.",
        action="store_true",
    )


# Validation evaluates a checkpoint as it is: it takes no config or dropout flags, and needs the checkpoint.
_VALIDATION_OMITS = ("config_name", "config_path", "attn_dropout", "hidden_dropout")
_VALIDATION_CHECKPOINT = {
    "required": True,
    "help": "Checkpoint (hub name or directory) to evaluate; its config.json gives the attention method.",
}


def add_model_args(
    parser: FlagParser, model_type: str, training: bool = True, omit: tuple[str, ...] = ()
) -> FlagParser:
    """Model flags of the training scripts, or (training=False) of the validation scripts, but `omit` (the flags
    of the other modality's preprocessor)."""
    changes = {"model_type": {"default": model_type, "choices": [model_type]}}
    if not training:
        changes["model_name_or_path"] = _VALIDATION_CHECKPOINT
    add_group(parser, "model", ModelArgs, "model", changes, omit=omit + (() if training else _VALIDATION_OMITS))
    add_attention_args(parser)
    return parser


def load_tokenizer(model_args: ModelArgs) -> PreTrainedTokenizerBase:
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        raise UsageError("No tokenizer: pass --tokenizer_name (or --model_name_or_path with a tokenizer).")
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=model_args.model_cache_dir)
    except (OSError, ValueError) as error:
        raise InputFileError(
            f"{flag} {name}: no tokenizer found there ({str(error).splitlines()[0]}); pass a tokenizer folder or "
            "hub name."
        ) from error


def read_yaml_overrides(path: str) -> dict:
    if not Path(path).is_file():
        raise InputFileError(f"--config_path {path} does not exist; pass a YAML file of config overrides.")
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise UsageError(f"--config_path {path} must hold a mapping of config keys to values.")
    return values


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, checkpoint: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"The tokenizer has {len(tokenizer)} tokens but {checkpoint} embeds only {config.vocab_size}; use the "
            "checkpoint's tokenizer."
        )


def check_sequence_length(config: PretrainedConfig, seq_length: int, flag: str) -> None:
    table = config.max_position_embeddings
    if seq_length > table:
        raise UsageError(
            f"--{flag} {seq_length} is longer than the model's position table (max_position_embeddings={table}); "
            f"use --{flag} <= {table}, or a config with more positions."
        )
    if seq_length < 2:
        raise UsageError(f"--{flag} must be at least 2, got {seq_length}.")


def build_config(model_args: ModelArgs) -> tuple[PretrainedConfig, str | None]:
    """The model config: the checkpoint's, --config_name's or the family default, then YAML overrides and
    dropout; with the checkpoint it came from (None: a new model). The values that come from the preprocessor
    and the data are the modality's (modalities.py `configure`)."""
    overrides = read_yaml_overrides(model_args.config_path) if model_args.config_path else {}
    base = model_args.model_name_or_path or model_args.config_name
    if base is None:
        config = AutoConfig.for_model(model_args.model_type)
    else:
        flag = "--model_name_or_path" if model_args.model_name_or_path else "--config_name"
        config = read_model_config(base, flag, model_args, training=True)
    unknown = sorted(set(overrides) - set(config.to_dict()) - {CONFIG_KEY} - set(EXTRA_CONFIG_KEYS))
    if unknown:
        raise UsageError(
            f"--config_path {model_args.config_path}: {unknown} are not {model_args.model_type} config keys."
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    if model_args.model_name_or_path is None and not model_args.config_name:
        # The family's from-scratch defaults, unless the YAML sets them.
        for key, default in get_family(model_args.model_type).scratch_defaults.items():
            if key not in overrides:
                setattr(config, key, default(config))
    dropout_keys = get_family(model_args.model_type).dropout_keys
    flags = ("--attn_dropout", "--hidden_dropout")
    for key, flag, value in zip(dropout_keys, flags, (model_args.attn_dropout, model_args.hidden_dropout), strict=True):
        if value is None:
            continue
        if key is None:
            raise UsageError(f"{flag}: {model_args.model_type} models have no such dropout; drop {flag}.")
        setattr(config, key, value)
    return config, model_args.model_name_or_path


def load_model(model_args: ModelArgs, config: PretrainedConfig, device: torch.device, family: str | None = None):
    """Build (or load) the model of `config`, which holds the resolved attention method (`resolve_method`), as
    `family`'s class (default: the model type's)."""
    cls = model_class(family or model_args.model_type)
    if model_args.model_name_or_path is not None:
        device_map = {"": device} if model_args.low_cpu_mem_usage else None
        model = _from_pretrained(
            cls,
            model_args.model_name_or_path,
            config=config,
            device_map=device_map,
            cache_dir=model_args.model_cache_dir,
        )
    elif model_args.low_cpu_mem_usage:
        with torch.device(device):
            model = cls(config)
    else:
        model = cls(config)
    logger.info(
        "Model: %s, %.1fM parameters, attention %s", cls.__name__, model.num_parameters() / 1e6, model.attention_config
    )
    return model


def _from_pretrained(cls, name: str, **options):
    """`cls.from_pretrained`, with one clear error for weights that are missing, truncated or corrupt."""
    try:
        return cls.from_pretrained(name, **options)
    except SafetensorError as error:
        raise InputFileError(
            f"--model_name_or_path {name}: its weights are truncated or corrupt ({error}); save the model again, or "
            "use an intact copy."
        ) from error
    except OSError as error:
        raise InputFileError(f"--model_name_or_path {name}: the weights cannot be loaded ({error}).") from error


def describe_model(config: PretrainedConfig, family: str | None = None) -> dict:
    """What `--dry_run` reports of a model of `family` (default: the config's): its class, parameter count and
    config, from a build on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        model = model_class(family or family_of_config(config).name)(config)
    return {
        "model_class": type(model).__name__,
        "parameters": model.num_parameters(),
        "modules": sorted({type(module).__name__ for module in model.modules()}),
        "config": config.to_dict(),
    }


def read_model_config(
    name: str, flag: str, model_args: ModelArgs, training: bool, script: str | None = None
) -> PretrainedConfig:
    """The model config at `name` (a folder or hub id, given by `flag`) for a script that trains (`training`) or
    evaluates `model_args.model_type` models: one line for no config there, a model_type transformers does not
    know, or another family's model (naming the script for it)."""
    family = model_args.model_type
    try:
        config = AutoConfig.from_pretrained(name, cache_dir=model_args.model_cache_dir)
    except (OSError, ValueError, KeyError) as error:
        raise InputFileError(
            f"{flag} {name}: no {family} model config there ({str(error).splitlines()[0]}); pass a directory "
            f"written by the training script (save_pretrained) or a hub id of a {family} model."
        ) from error
    if config.model_type != family:
        other = FAMILIES.get(config.model_type)
        if other is None:
            fix = f"valid model types: {', '.join(FAMILIES)}"
        else:
            fix = f"use {other.train_script if training else other.validate_script} for it"
        job = script or get_family(family).train_script
        verb = "trains" if training else "evaluates"
        raise UsageError(f"{name} holds a {config.model_type!r} model, but {job} {verb} {family!r} models; {fix}.")
    return config


def load_checkpoint_config(model_args: ModelArgs, script: str) -> PretrainedConfig:
    """The config of the checkpoint to evaluate, with one clear error for a missing one or the wrong family."""
    name = model_args.model_name_or_path
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise InputFileError(
            f"--model_name_or_path {name} does not exist; pass a directory written by the training script "
            "(save_pretrained) or a hub model id."
        )
    return read_model_config(name, "--model_name_or_path", model_args, training=False, script=script)


# Weights a checkpoint may carry only when its config.json says so (else they would be dropped without a word).
STRAY_WEIGHTS = {
    "attention_variant": "attention-variant weights its config does not use",
    "shortcut_affine": f"equivalent-transform shortcut affines, but its config.json names no {TRANSFORMS_KEY}",
}


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """One line naming the first weight that holds NaN or infinity: such a model evaluates to NaN everywhere."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UsageError(
                f"{source}: the weight {name} holds {bad} non-finite value(s) of {tensor.numel()}; evaluate an "
                "intact checkpoint (e.g. an earlier step_N of its run)."
            )


def load_checkpoint(model_args: ModelArgs, config: PretrainedConfig, device: torch.device, family: str | None = None):
    """The checkpoint's model exactly as saved, as `family`'s class (default: the config's): every weight must come
    from the checkpoint (a gate that its config.json names but its weights lack would otherwise be freshly
    initialised without a word)."""
    device_map = {"": device} if model_args.low_cpu_mem_usage else None
    model, info = _from_pretrained(
        model_class(family or family_of_config(config).name),
        model_args.model_name_or_path,
        config=config,
        device_map=device_map,
        cache_dir=model_args.model_cache_dir,
        output_loading_info=True,
    )
    problems = [f"missing weights {info['missing_keys']}"] if info["missing_keys"] else []
    if info.get("mismatched_keys"):
        problems.append(f"weights of another shape {[key for key, *_ in info['mismatched_keys']]}")
    for marker, what in STRAY_WEIGHTS.items():
        stray = [key for key in info["unexpected_keys"] if marker in key]
        if stray:
            problems.append(f"{what} {stray}")
    if problems:
        raise UsageError(
            f"{model_args.model_name_or_path} does not match its config.json ({'; '.join(problems)}); evaluate the "
            "directory the training script wrote, with the config.json saved beside its weights."
        )
    check_finite_weights(model, model_args.model_name_or_path)
    logger.info("Loaded %s: %.1fM parameters", model_args.model_name_or_path, model.num_parameters() / 1e6)
    return model.eval()
