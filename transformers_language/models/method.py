"""The attention method of a run, from the method flags and the model config: training takes the flags (else the
config's stored method; both set must agree) and stores the result in the config; evaluation takes the
checkpoint's method, and flags may repeat it but never contradict it."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from ..errors import UsageError
from .attention_config import AttentionArgs, AttentionConfig, attention_config_from_args, gate_network_switches
from .loading import ModelArgs


def resolve_attention(from_flags: AttentionConfig, from_config: AttentionConfig, source: str) -> AttentionConfig:
    """The flags' method when any method flag is given, else the config's; both set and different is an error."""
    if from_flags == AttentionConfig():
        return from_config
    if from_config not in (AttentionConfig(), from_flags):
        raise UsageError(
            f"The method flags ask for {from_flags} but {source} holds {from_config}; drop the flags to keep the "
            "stored method, or start from a checkpoint without one."
        )
    return from_flags


def resolve_method(
    flags: AttentionArgs, model_args: ModelArgs, config: PretrainedConfig, train_seq_length: int
) -> AttentionConfig:
    """The run's attention method (flags, else the config's), stored in `config`."""
    if flags.fine_tuning and model_args.model_name_or_path is None:
        raise UsageError(
            "--fine_tuning initialises gates added to a pretrained model: pass its --model_name_or_path, or drop "
            "--fine_tuning to train from scratch."
        )
    source = f"the checkpoint {model_args.model_name_or_path}" if model_args.model_name_or_path else "the model config"
    attention = resolve_attention(
        attention_config_from_args(flags, train_seq_length), AttentionConfig.from_model_config(config), source
    )
    attention.apply_to(config)
    return attention


def _softmax_description(config: AttentionConfig) -> str:
    if config.alpha is not None:
        clipped = f"{config.normaliser}, " if config.normaliser != "vanilla" else ""
        return f"{clipped}alpha={config.alpha:g} (T_train={config.train_seq_length}, gamma={config.gamma:g})"
    return repr(config.softmax)


def check_method_flags(flags: AttentionArgs, stored: AttentionConfig, seq_length: int, source: str) -> None:
    """Evaluation takes the attention method from the checkpoint. Method flags may repeat it (the paper's
    commands pass them), but a flag that states something else is an error naming both values."""
    try:
        given = attention_config_from_args(flags, stored.train_seq_length or seq_length)
    except UsageError as error:  # e.g. a gate network flag without a gate type, against a vanilla checkpoint
        raise UsageError(
            f"The method flags do not state a method ({error.args[0].split(';')[0]}), and the method of {source} "
            f"comes from its config.json ({stored}): drop the method flags, or make them state that method."
        ) from error
    conflicts = []
    if flags.attn_softmax is not None or flags.alpha is not None:
        same = (
            given.normaliser == stored.normaliser
            and given.clipped == stored.clipped
            and math.isclose(given.gamma, stored.gamma, rel_tol=1e-9, abs_tol=1e-12)
            and math.isclose(given.zeta, stored.zeta, rel_tol=1e-9)
        )
        if not same:
            flag = f"--alpha {flags.alpha:g}" if flags.alpha is not None else f"--attn_softmax {flags.attn_softmax!r}"
            conflicts.append(f"{flag} but {source} has softmax {_softmax_description(stored)}")
    network_flags = [flag for flag, _, given_flag in gate_network_switches(flags) if given_flag]
    stated = [
        ("--attn_gate_type", flags.attn_gate_type is not None, "gate_type"),
        (network_flags[0] if network_flags else "", bool(network_flags), "gate_network"),
        ("--attn_gate_init", flags.attn_gate_init is not None, "init_prob"),
        ("--fine_tuning", flags.fine_tuning, "fine_tuning"),
        ("--skip_attn", flags.skip_attn, "skip_attn"),
        ("--attn_bias_kv", flags.attn_bias_kv, "bias_kv"),
    ]
    for flag, given_flag, field in stated:
        if given_flag and getattr(given, field) != getattr(stored, field):
            conflicts.append(
                f"{flag} gives {field}={getattr(given, field)!r} but {source} has {field}={getattr(stored, field)!r}"
            )
    if conflicts:
        raise UsageError(
            "The method flags contradict the checkpoint: "
            + "; ".join(conflicts)
            + ". The method comes from the checkpoint's config.json: drop the method flags or make them match."
        )
