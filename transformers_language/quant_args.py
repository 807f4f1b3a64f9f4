"""The W8A8 flags of `validate_*.py` (the paper's, and the post-training methods': granularity, PEG, per-point
bits, LLM.int8()), resolved once into a `QuantConfig` with every combination that makes no sense refused.

The per-point flags take point names or patterns of them (`*`: one name segment, `**`: any number;
quantized_model.py names the points; `--list_quant_points` prints them). `--point_bits MP-PTQ` is the
preset of Bondarenko et al. (2021): the family's three outlier tensors of every layer at 16 bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from quantization.calibration import CALIBRATION_INPUTS
from quantization.config import (
    ACT_GRANULARITIES,
    HIGH_PRECISION_BITS,
    PER_EMBEDDING_GROUP,
    QUANT_PRESETS,
    WEIGHT_GRANULARITIES,
    QuantConfig,
)
from quantization.decomposition import DEFAULT_THRESHOLD
from quantization.estimators import PERCENTILE_INTERPOLATIONS

from .arguments import add_group, arg, parse_group, switch
from .errors import UsageError
from .families import Family, get_family
from .quantized_model import outlier_point_patterns

CALIBRATION_SPLITS = ("train", "validation")
# Named --point_bits presets -> (the family's point patterns, bits).
POINT_BIT_PRESETS = {"MP-PTQ": (outlier_point_patterns, HIGH_PRECISION_BITS)}
_RULE = re.compile(r"^(?P<pattern>[^=]+)=(?P<bits>\d+)$")


@dataclass(frozen=True)
class QuantizationArgs:
    """The W8A8 flags of the paper's validation commands (each works for both model families); the defaults
    of the simulation itself are QuantConfig's."""

    quantize: bool = switch("Evaluate the W8A8 (or --n_bits/--n_bits_act) model.")
    est_num_batches: int = arg(16, "Calibration batches for activation ranges.", type=int)
    per_device_train_batch_size: int = arg(
        8,
        "Sequences per calibration batch from the training split (the paper calibrated on training batches).",
        type=int,
    )
    n_bits: int = arg(QuantConfig.n_bits, "Weight bits.", type=int)
    n_bits_act: int = arg(QuantConfig.n_bits_act, "Activation bits.", type=int)
    no_weight_quant: bool = switch("Keep the weights FP.")
    no_act_quant: bool = switch("Keep the activations FP.")
    qmethod_acts: str = arg(QuantConfig.qmethod_acts, "asymmetric_uniform or symmetric_uniform.")
    ranges_weights: str = arg(
        QuantConfig.ranges_weights,
        "Weight ranges: minmax, MSE or L<p> (e.g. L2.4); the default is the paper's for this family.",
    )
    ranges_acts: str = arg(QuantConfig.ranges_acts, "Activation ranges: running_minmax, current_minmax, MSE, L<p>.")
    percentile: float | None = arg(QuantConfig.percentile, "Min-max ranges from percentiles P / 100-P.", type=float)
    percentile_interpolation: str = arg(
        QuantConfig.percentile_interpolation,
        "How --percentile reads the sorted values: linear (numpy.percentile, the paper's) or nearest rank.",
        choices=list(PERCENTILE_INTERPOLATIONS),
    )
    quant_setup: str = arg(QuantConfig.quant_setup, f"Preset: {', '.join(QUANT_PRESETS)}.")
    calibration_split: str = arg(
        "train",
        "Where calibration batches come from (validation: only to reproduce the paper's BERT runs).",
        choices=CALIBRATION_SPLITS,
    )
    calibration_inputs: str = arg(
        QuantConfig.calibration_inputs,
        "What activation quantizers observe while calibrating: quantized upstream values (the paper's code) or "
        "float ones.",
        choices=list(CALIBRATION_INPUTS),
    )
    weight_granularity: str = arg(
        QuantConfig.weight_granularity,
        "per_tensor, or per_channel: one range per output row of each Linear and embedding table.",
        choices=list(WEIGHT_GRANULARITIES),
    )
    act_granularity: str = arg(
        QuantConfig.act_granularity,
        "per_tensor; per_embedding_group (PEG, on --peg_points; the rest per tensor); per_token (every "
        "activation, dynamic ranges).",
        choices=list(ACT_GRANULARITIES),
    )
    peg_groups: int = arg(QuantConfig.peg_groups, "PEG: embedding groups K per point.", type=int)
    peg_permute: bool = switch("PEG: range-based permutation (group channels by calibrated range).")
    peg_points: tuple[str, ...] | None = arg(
        None,
        "PEG: point names or patterns (default: the family's FFN input, FFN output and FFN residual sum).",
        nargs="+",
        metavar="POINT",
    )
    point_bits: tuple[str, ...] | None = arg(
        None,
        "Per-point bit widths: POINT=BITS rules (names or patterns: * one name segment, ** any; the last match "
        "wins) or MP-PTQ (the FFN input, FFN output and FFN residual sum of every layer at 16 bits).",
        nargs="+",
        metavar="RULE",
    )
    llm_int8: bool = switch(
        "LLM.int8() decomposition: input channels reaching --llm_int8_threshold stay FP in each quantized "
        "Linear; the rest per-token times per-channel weights; no other activation is quantized."
    )
    llm_int8_threshold: float = arg(DEFAULT_THRESHOLD, "LLM.int8(): the outlier threshold on |x|.", type=float)
    gamma_migration: bool = switch(
        "Gamma migration (Outlier Suppression): quantize each LayerNorm's non-scaling output; gamma moves into "
        "the Linears (and the post-LN shortcut) that read it."
    )
    smoothquant: bool = switch(
        "SmoothQuant: per-channel scales max|X|^alpha / max|W|^(1-alpha) from calibration, folded into each "
        "LayerNorm and its readers."
    )
    smoothquant_alpha: float = arg(QuantConfig.smoothquant_alpha, "SmoothQuant's alpha in [0, 1].", type=float)
    os_plus: bool = switch(
        "OS+: per-channel shift (range middle) and scale max(1, range / t) of each LayerNorm output, t searched "
        "on the quantized output error of its readers; folded into the LayerNorm and its readers."
    )
    os_plus_grid: int = arg(QuantConfig.os_plus_grid, "OS+: candidate thresholds t per LayerNorm.", type=int)
    token_clipping: bool = switch(
        "Token-wise clipping (Outlier Suppression): activation ranges from quantiles of the per-token maxima / "
        "minima, the quantile chosen by the final output's loss against FP."
    )
    token_clipping_points: tuple[str, ...] | None = arg(
        None,
        "Token-wise clipping: point names or patterns (default: every activation point but PEG's).",
        nargs="+",
        metavar="POINT",
    )
    token_clipping_quantiles: tuple[float, ...] = arg(
        QuantConfig.token_clipping_quantiles,
        "Token-wise clipping: the quantiles q searched (one value: that q, no search).",
        nargs="+",
        type=float,
        metavar="Q",
    )
    token_clipping_fine_steps: int = arg(
        QuantConfig.token_clipping_fine_steps,
        "Token-wise clipping's fine stage: steps learning the clipping ranges on the same loss (0: off).",
        type=int,
    )
    token_clipping_learning_rate: float = arg(
        QuantConfig.token_clipping_learning_rate, "Token-wise clipping's fine stage: Adam learning rate.", type=float
    )
    list_quant_points: bool = switch("Print the quantization points of the checkpoint with these flags, then exit.")


def add_quantization_args(parser, ranges_weights: str) -> None:
    """The W8A8 group; `ranges_weights` is the family's weight estimator in the paper (BERT min-max, OPT MSE)."""
    add_group(parser, QuantizationArgs, "W8A8 simulation", {"ranges_weights": {"default": ranges_weights}})


def calibration_batch_size(args) -> int:
    """A calibration batch is a batch of the loader it comes from, as in the paper's code: training batches
    (--per_device_train_batch_size) from the training split, evaluation batches from the validation split."""
    return args.per_device_train_batch_size if args.calibration_split == "train" else args.per_device_eval_batch_size


QUANT_FIELDS = tuple(
    f.name
    for f in fields(QuantConfig)
    if f.name
    not in (
        "weight_quant",
        "act_quant",
        "peg_points",
        "point_bits",
        "llm_int8_threshold",
        "transforms",
        "token_clipping_points",
        "token_clipping_quantiles",
    )
)
# The flags of the equivalent transforms -> their names in quantization.transforms.TRANSFORMS.
TRANSFORM_FLAGS = {"gamma_migration": "gamma_migration", "smoothquant": "smoothquant", "os_plus": "os_plus"}
# Flags that configure one method -> the flag that turns it on.
SUB_FLAGS = {
    "smoothquant_alpha": "smoothquant",
    "os_plus_grid": "os_plus",
    "token_clipping_points": "token_clipping",
    "token_clipping_quantiles": "token_clipping",
    "token_clipping_fine_steps": "token_clipping",
    "token_clipping_learning_rate": "token_clipping",
}


def _changed(flags: QuantizationArgs, defaults: QuantizationArgs, names) -> list[str]:
    return [f"--{name}" for name in names if getattr(flags, name) != getattr(defaults, name)]


def parse_point_bits(rules: tuple[str, ...] | None, family: Family) -> tuple[tuple[str, int], ...]:
    """--point_bits as (pattern, bits) rules: named presets expand to the family's patterns."""
    parsed = []
    for rule in rules or ():
        if rule in POINT_BIT_PRESETS:
            patterns, bits = POINT_BIT_PRESETS[rule]
            parsed += [(pattern, bits) for pattern in patterns(family)]
            continue
        match = _RULE.match(rule)
        if match is None:
            raise UsageError(
                f"--point_bits {rule!r}: write POINT=BITS (e.g. '**.fc2.output=16') or a preset: "
                f"{', '.join(POINT_BIT_PRESETS)}."
            )
        parsed.append((match["pattern"], int(match["bits"])))
    return tuple(parsed)


def _check_combinations(flags: QuantizationArgs, defaults: QuantizationArgs) -> None:
    peg = _changed(flags, defaults, ("peg_groups", "peg_permute", "peg_points"))
    if peg and flags.act_granularity != PER_EMBEDDING_GROUP:
        raise UsageError(f"{', '.join(peg)} configure PEG: add --act_granularity {PER_EMBEDDING_GROUP}, or drop them.")
    for flag, method in SUB_FLAGS.items():
        if getattr(flags, flag) != getattr(defaults, flag) and not getattr(flags, method):
            raise UsageError(f"--{flag} configures --{method}: add --{method}, or drop it.")
    if flags.no_act_quant and flags.token_clipping:
        raise UsageError("--token_clipping sets activation ranges, which --no_act_quant turns off.")
    if flags.llm_int8_threshold != defaults.llm_int8_threshold and not flags.llm_int8:
        raise UsageError("--llm_int8_threshold sets the LLM.int8() threshold: add --llm_int8, or drop it.")
    if flags.no_act_quant:
        act = _changed(flags, defaults, ("act_granularity", "llm_int8", "n_bits_act", "ranges_acts", "percentile"))
        if act:
            raise UsageError(f"{', '.join(act)} configure activation quantization, which --no_act_quant turns off.")
    if flags.no_weight_quant:
        weight = _changed(flags, defaults, ("weight_granularity", "n_bits", "ranges_weights"))
        if weight:
            raise UsageError(f"{', '.join(weight)} configure weight quantization, which --no_weight_quant turns off.")
    if flags.llm_int8:
        preset = QUANT_PRESETS.get(flags.quant_setup)  # an unknown name is QuantConfig's error
        if preset is not None and preset.int16_layernorms != "none":
            raise UsageError(
                f"--quant_setup {flags.quant_setup} sets LayerNorm bits, but --llm_int8 quantizes only the Linears: "
                "use fp32_head or all."
            )
        static = _changed(flags, defaults, ("act_granularity", "ranges_acts", "percentile", "calibration_inputs"))
        if static:
            raise UsageError(
                f"{', '.join(static)} do not apply with --llm_int8: it quantizes each Linear's input per token "
                "(dynamic) and no other activation."
            )
    if flags.act_granularity == "per_token":
        static = _changed(flags, defaults, ("ranges_acts", "percentile", "calibration_inputs"))
        if static:
            raise UsageError(f"{', '.join(static)} do not apply with --act_granularity per_token (dynamic ranges).")


def quant_config_from_args(args) -> QuantConfig | None:
    """The QuantConfig of --quantize, or None; a W8A8 flag without --quantize is an error."""
    family = get_family(args.model_type)
    flags = parse_group(QuantizationArgs, args)
    defaults = QuantizationArgs(ranges_weights=family.weight_ranges)
    if not (flags.quantize or flags.list_quant_points):
        changed = _changed(flags, defaults, [f.name for f in fields(flags)])
        if changed:
            raise UsageError(f"{', '.join(changed)} configure the W8A8 simulation: add --quantize, or drop them.")
        return None
    for flag in ("est_num_batches", "per_device_train_batch_size", "peg_groups"):
        if getattr(flags, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(flags, flag)}.")
    if math.isnan(flags.llm_int8_threshold) or flags.llm_int8_threshold < 0:
        raise UsageError(f"--llm_int8_threshold must be >= 0 (inf: no decomposition), got {flags.llm_int8_threshold}.")
    _check_combinations(flags, defaults)
    peg_points = ()
    if flags.act_granularity == PER_EMBEDDING_GROUP:
        peg_points = tuple(flags.peg_points or outlier_point_patterns(family))
    token_clipping_points = ()
    if flags.token_clipping:
        token_clipping_points = tuple(flags.token_clipping_points or ("**",))
    try:
        return QuantConfig(
            transforms=tuple(name for flag, name in TRANSFORM_FLAGS.items() if getattr(flags, flag)),
            token_clipping_points=token_clipping_points,
            token_clipping_quantiles=tuple(flags.token_clipping_quantiles),
            weight_quant=not flags.no_weight_quant,
            act_quant=not flags.no_act_quant,
            peg_points=peg_points,
            point_bits=parse_point_bits(flags.point_bits, family),
            llm_int8_threshold=flags.llm_int8_threshold if flags.llm_int8 else None,
            **{f: getattr(flags, f) for f in QUANT_FIELDS},
        )
    except ValueError as error:  # its message names the flag
        raise UsageError(str(error)) from error
