"""Tokenizer, model config and model for a run: from scratch (config + YAML overrides) or from a checkpoint.

A from-scratch model takes its vocabulary size and special-token ids from the tokenizer. A checkpoint keeps
every pretrained weight; gates requested by the method flags are added (and initialised) on top. The
attention method comes from the flags, or from the checkpoint / YAML when no method flag is given; both at
once must agree.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .attention_config import CONFIG_KEY, AttentionConfig, add_attention_args, attention_config_from_args
from .models import model_class

logger = logging.getLogger(__name__)

# (attention dropout, hidden dropout) config keys per model family.
DROPOUT_KEYS = {
    "bert": ("attention_probs_dropout_prob", "hidden_dropout_prob"),
    "opt": ("attention_dropout", "dropout"),
}


def add_model_args(parser: argparse.ArgumentParser, model_type: str) -> argparse.ArgumentParser:
    group = parser.add_argument_group("model")
    group.add_argument("--model_type", default=model_type, choices=[model_type], help="Model family.")
    group.add_argument("--config_name", default=None, help="HF config name or path to start from.")
    group.add_argument(
        "--config_path", default=None, help="YAML file of config overrides (e.g. model_configs/opt-small.yaml)."
    )
    group.add_argument(
        "--model_name_or_path", default=None, help="Checkpoint to continue from or fine-tune (hub name or path)."
    )
    group.add_argument("--tokenizer_name", default=None, help="Tokenizer name or path (default: the checkpoint's).")
    group.add_argument("--attn_dropout", type=float, default=None, help="Attention-probability dropout.")
    group.add_argument("--hidden_dropout", type=float, default=None, help="Hidden-state dropout.")
    group.add_argument(
        "--low_cpu_mem_usage",
        action="store_true",
        help="Build or load the model directly on the accelerator, never holding a full copy in CPU memory.",
    )
    add_attention_args(parser)
    return parser


def load_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    name = args.tokenizer_name or args.model_name_or_path
    if name is None:
        raise ValueError("No tokenizer: pass --tokenizer_name (or --model_name_or_path with a tokenizer).")
    return AutoTokenizer.from_pretrained(name)


def read_yaml_overrides(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config_path {path} does not exist; pass a YAML file of config overrides.")
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config_path {path} must hold a mapping of config keys to values.")
    return values


def resolve_attention(from_flags: AttentionConfig, from_config: AttentionConfig, source: str) -> AttentionConfig:
    """The flags' method when any method flag is given, else the config's; both set and different is an error."""
    if from_flags == AttentionConfig():
        return from_config
    if from_config not in (AttentionConfig(), from_flags):
        raise ValueError(
            f"The method flags ask for {from_flags} but {source} holds {from_config}; drop the flags to keep the "
            "stored method, or start from a checkpoint without one."
        )
    return from_flags


def check_sequence_length(config: PretrainedConfig, seq_length: int, flag: str) -> None:
    table = config.max_position_embeddings
    if seq_length > table:
        raise ValueError(
            f"--{flag} {seq_length} is longer than the model's position table (max_position_embeddings={table}); "
            f"use --{flag} <= {table}, or a config with more positions."
        )
    if seq_length < 2:
        raise ValueError(f"--{flag} must be at least 2, got {seq_length}.")


def build_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The model config: checkpoint's, --config_name's or the family default, then YAML overrides."""
    overrides = read_yaml_overrides(args.config_path) if args.config_path else {}
    from_checkpoint = args.model_name_or_path is not None
    base = args.model_name_or_path or args.config_name
    config = AutoConfig.from_pretrained(base) if base else AutoConfig.for_model(args.model_type)
    if config.model_type != args.model_type:
        raise ValueError(f"{base} is a {config.model_type!r} model; this script trains {args.model_type!r} models.")
    unknown = sorted(set(overrides) - set(config.to_dict()) - {CONFIG_KEY})
    if unknown:
        raise ValueError(f"--config_path {args.config_path}: {unknown} are not {args.model_type} config keys.")
    for key, value in overrides.items():
        setattr(config, key, value)
    if not from_checkpoint:
        config.vocab_size = len(tokenizer)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None and name in config.to_dict():
                setattr(config, name, getattr(tokenizer, name))
        if args.model_type == "opt" and "word_embed_proj_dim" not in overrides and not args.config_name:
            config.word_embed_proj_dim = config.hidden_size  # no project_in / project_out layers
    elif len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but {base} embeds only {config.vocab_size}; use the "
            "checkpoint's tokenizer."
        )
    for key, value in zip(DROPOUT_KEYS[args.model_type], (args.attn_dropout, args.hidden_dropout), strict=True):
        if value is not None:
            setattr(config, key, value)
    return config


def load_model(args: argparse.Namespace, config: PretrainedConfig, train_seq_length: int, device: torch.device):
    """Build (or load) the model with the resolved attention method stored in `config`."""
    source = f"the checkpoint {args.model_name_or_path}" if args.model_name_or_path else "the model config"
    attention = resolve_attention(
        attention_config_from_args(args, train_seq_length), AttentionConfig.from_model_config(config), source
    )
    attention.apply_to(config)
    cls = model_class(args.model_type)
    if args.model_name_or_path is not None:
        device_map = {"": device} if args.low_cpu_mem_usage else None
        model = cls.from_pretrained(args.model_name_or_path, config=config, device_map=device_map)
    elif args.low_cpu_mem_usage:
        with torch.device(device):
            model = cls(config)
    else:
        model = cls(config)
    logger.info("Model: %s, %.1fM parameters, attention %s", cls.__name__, model.num_parameters() / 1e6, attention)
    return model
