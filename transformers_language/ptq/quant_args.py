"""The W8A8 flags of `validate_*.py` (the paper's, and the post-training methods': granularity, PEG, per-point
bits, LLM.int8()), resolved once into a `QuantConfig` with every combination that makes no sense refused.

The per-point flags take point names or patterns of them (`*`: one name segment, `**`: any number;
quantized_model.py names the points; `--list_quant_points` prints them). `--point_bits MP-PTQ` is the
preset of Bondarenko et al. (2021): the family's three outlier tensors of every layer at 16 bits.
"""

from __future__ import annotations

import re
from dataclasses import fields, make_dataclass

from quantization.config import HIGH_PRECISION_BITS, PER_EMBEDDING_GROUP, QUANT_PRESETS, QuantConfig
from quantization.decomposition import DEFAULT_THRESHOLD
from quantization.float_quantizers import INTEGER

from ..arguments import POSITIVE, FlagParser, add_group, arg, switch
from ..errors import UsageError
from ..families import Family
from .quantized_model import outlier_point_patterns

CALIBRATION_SPLITS = ("train", "validation")
# Named --point_bits presets -> (the family's point patterns, bits).
POINT_BIT_PRESETS = {"MP-PTQ": (outlier_point_patterns, HIGH_PRECISION_BITS)}
_RULE = re.compile(r"^(?P<pattern>[^=]+)=(?P<bits>\d+)$")


def _flag_only_fields() -> tuple[list[tuple], list[tuple]]:
    """The W8A8 flags that are not a QuantConfig field of the same name: (those listed before the mirrored
    ones, those listed after)."""
    before = [
        ("quantize", bool, switch("Evaluate the W8A8 (or --n_bits/--n_bits_act) model.")),
        ("est_num_batches", int, arg(16, "Calibration batches for activation ranges.", POSITIVE, type=int)),
        (
            "per_device_train_batch_size",
            int,
            arg(
                8,
                "Sequences per calibration batch from the training split (the paper calibrated on training batches).",
                POSITIVE,
                type=int,
            ),
        ),
    ]
    after = [
        (
            "calibration_split",
            str,
            arg(
                "train",
                "Where calibration batches come from (validation: only to reproduce the paper's BERT runs).",
                choices=CALIBRATION_SPLITS,
            ),
        ),
        (
            "calibration_seed",
            int | None,
            arg(
                None,
                "Seed of the calibration sample (default: --seed); draws of several seeds show how much a result "
                "depends on the calibration batches.",
                type=int,
            ),
        ),
        ("no_weight_quant", bool, switch("Keep the weights FP.")),
        ("no_act_quant", bool, switch("Keep the activations FP.")),
        (
            "peg_points",
            tuple[str, ...] | None,
            arg(
                None,
                "PEG: point names or patterns (default: the family's FFN input, FFN output and FFN residual sum).",
                nargs="+",
                metavar="POINT",
            ),
        ),
        (
            "point_bits",
            tuple[str, ...] | None,
            arg(
                None,
                "Per-point bit widths: POINT=BITS rules (names or patterns: * one name segment, ** any; the last "
                "match wins) or MP-PTQ (the FFN input, FFN output and FFN residual sum of every layer at 16 bits; "
                "Llama: also the SwiGLU product). A KV-cache bit width: '**.attention_variant.keys=4' "
                "'**.v_proj.output=4'.",
                nargs="+",
                metavar="RULE",
            ),
        ),
        (
            "point_formats",
            tuple[str, ...] | None,
            arg(
                None,
                "Per-point number formats: POINT=FORMAT rules (patterns as --point_bits; the last match wins; int is "
                "the integer grid), e.g. '**.fc2.output=fp8_e4m3' or '**.fc1.weight=mxfp4'.",
                nargs="+",
                metavar="RULE",
            ),
        ),
        (
            "llm_int8",
            bool,
            switch(
                "LLM.int8() decomposition: input channels reaching --llm_int8_threshold stay FP in each quantized "
                "Linear; the rest per-token times per-channel weights; no other activation is quantized."
            ),
        ),
        ("llm_int8_threshold", float, arg(DEFAULT_THRESHOLD, "LLM.int8(): the outlier threshold on |x|.", type=float)),
        (
            "gamma_migration",
            bool,
            switch(
                "Gamma migration (Outlier Suppression): quantize each LayerNorm's non-scaling output; gamma moves "
                "into the Linears (and the post-LN shortcut) that read it."
            ),
        ),
        (
            "smoothquant",
            bool,
            switch(
                "SmoothQuant: per-channel scales max|X|^alpha / max|W|^(1-alpha) from calibration, folded into "
                "each LayerNorm and its readers."
            ),
        ),
        (
            "os_plus",
            bool,
            switch(
                "OS+: per-channel shift (range middle) and scale max(1, range / t) of each LayerNorm output, t "
                "searched on the quantized output error of its readers; folded into the LayerNorm and its readers."
            ),
        ),
        (
            "token_clipping",
            bool,
            switch(
                "Token-wise clipping (Outlier Suppression): activation ranges from quantiles of the per-token "
                "maxima / minima, the quantile chosen by the final output's loss against FP."
            ),
        ),
        (
            "token_clipping_points",
            tuple[str, ...] | None,
            arg(
                None,
                "Token-wise clipping: point names or patterns (default: every activation point but PEG's).",
                nargs="+",
                metavar="POINT",
            ),
        ),
        (
            "list_quant_points",
            bool,
            switch("Print the quantization points of the checkpoint with these flags, then exit."),
        ),
    ]
    return before, after


# The QuantConfig fields that are flags of the same name (help text and options declared there, once).
QUANT_FIELDS = tuple(f.name for f in fields(QuantConfig) if "flag" in f.metadata)
_BEFORE, _AFTER = _flag_only_fields()
QuantizationArgs = make_dataclass(
    "QuantizationArgs",
    [
        *_BEFORE,
        *(
            (f.name, f.type, arg(f.default, f.metadata["help"], **f.metadata["flag"]))
            for f in fields(QuantConfig)
            if f.name in QUANT_FIELDS
        ),
        *_AFTER,
    ],
    frozen=True,
)
QuantizationArgs.__doc__ = """The W8A8 flags of the paper's validation commands (each works for every model family): the
QuantConfig fields of the same name, and the flags that map onto its other fields."""


def add_quantization_args(parser: FlagParser, ranges_weights: str) -> None:
    """The W8A8 group; `ranges_weights` is the family's weight estimator in the paper (BERT min-max, OPT MSE)."""
    add_group(
        parser, "quantization", QuantizationArgs, "W8A8 simulation", {"ranges_weights": {"default": ranges_weights}}
    )


def calibration_batch_size(flags: QuantizationArgs, eval_batch_size: int) -> int:
    """A calibration batch is a batch of the loader it comes from, as in the paper's code: training batches
    (--per_device_train_batch_size) from the training split, evaluation batches from the validation split."""
    return flags.per_device_train_batch_size if flags.calibration_split == "train" else eval_batch_size


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
    "rotation_seed": "quarot",
    "gptq_block_size": "gptq",
    "gptq_damping": "gptq",
    "gptq_act_order": "gptq",
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


def parse_point_formats(rules: tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """--point_formats as (pattern, format) rules."""
    parsed = []
    for rule in rules or ():
        pattern, _, number_format = rule.rpartition("=")
        if not pattern:
            raise UsageError(f"--point_formats {rule!r}: write POINT=FORMAT (e.g. '**.fc2.output=fp8_e4m3').")
        parsed.append((pattern, number_format))
    return tuple(parsed)


def _check_combinations(flags: QuantizationArgs, defaults: QuantizationArgs) -> None:
    peg = _changed(flags, defaults, ("peg_groups", "peg_permute", "peg_points"))
    if peg and flags.act_granularity != PER_EMBEDDING_GROUP:
        raise UsageError(f"{', '.join(peg)} configure PEG: add --act_granularity {PER_EMBEDDING_GROUP}, or drop them.")
    for flag, method in SUB_FLAGS.items():
        if getattr(flags, flag) != getattr(defaults, flag) and not getattr(flags, method):
            raise UsageError(f"--{flag} configures --{method}: add --{method}, or drop it.")
    if flags.weight_group_size != defaults.weight_group_size and flags.weight_granularity != "per_group":
        raise UsageError("--weight_group_size sizes per_group weights: add --weight_granularity per_group, or drop it.")
    if flags.no_act_quant and flags.token_clipping:
        raise UsageError("--token_clipping sets activation ranges, which --no_act_quant turns off.")
    if flags.llm_int8_threshold != defaults.llm_int8_threshold and not flags.llm_int8:
        raise UsageError("--llm_int8_threshold sets the LLM.int8() threshold: add --llm_int8, or drop it.")
    if flags.no_act_quant:
        act = _changed(
            flags,
            defaults,
            ("act_granularity", "llm_int8", "n_bits_act", "ranges_acts", "percentile", "act_format", "n_bits_kv"),
        )
        if act:
            raise UsageError(f"{', '.join(act)} configure activation quantization, which --no_act_quant turns off.")
    if flags.no_weight_quant:
        weight = _changed(flags, defaults, ("weight_granularity", "n_bits", "ranges_weights", "weight_format", "gptq"))
        if weight:
            raise UsageError(f"{', '.join(weight)} configure weight quantization, which --no_weight_quant turns off.")
    if flags.llm_int8:
        preset = QUANT_PRESETS.get(flags.quant_setup)  # an unknown name is QuantConfig's error
        if preset is not None and preset.int16_layernorms != "none":
            raise UsageError(
                f"--quant_setup {flags.quant_setup} sets LayerNorm bits, but --llm_int8 quantizes only the Linears: "
                "use fp32_head or all."
            )


def quant_config_from_args(flags: QuantizationArgs, family: Family) -> QuantConfig | None:
    """The QuantConfig of --quantize, or None; a W8A8 flag without --quantize is an error. Value ranges and the
    rules among QuantConfig's own settings are its checks; here only what concerns the flags themselves."""
    defaults = QuantizationArgs(ranges_weights=family.weight_ranges)
    if not (flags.quantize or flags.list_quant_points):
        changed = _changed(flags, defaults, [f.name for f in fields(flags)])
        if changed:
            raise UsageError(f"{', '.join(changed)} configure the W8A8 simulation: add --quantize, or drop them.")
        return None
    _check_combinations(flags, defaults)
    peg_points = ()
    if flags.act_granularity == PER_EMBEDDING_GROUP:
        peg_points = tuple(flags.peg_points or outlier_point_patterns(family))
    token_clipping_points = ()
    if flags.token_clipping:
        token_clipping_points = tuple(flags.token_clipping_points or ("**",))
    same_named = {name: getattr(flags, name) for name in QUANT_FIELDS}
    same_named["token_clipping_quantiles"] = tuple(flags.token_clipping_quantiles)  # nargs gives a list
    point_formats = parse_point_formats(flags.point_formats)
    formats_in_use = flags.weight_format != INTEGER or any(fmt != INTEGER for _, fmt in point_formats)
    if formats_in_use and flags.ranges_weights == defaults.ranges_weights:
        same_named["ranges_weights"] = "minmax"  # a float format's scale is the maximum's, whatever the family's search
    try:
        return QuantConfig(
            **same_named,
            transforms=tuple(name for flag, name in TRANSFORM_FLAGS.items() if getattr(flags, flag)),
            token_clipping_points=token_clipping_points,
            weight_quant=not flags.no_weight_quant,
            act_quant=not flags.no_act_quant,
            peg_points=peg_points,
            point_bits=parse_point_bits(flags.point_bits, family),
            point_formats=point_formats,
            llm_int8_threshold=flags.llm_int8_threshold if flags.llm_int8 else None,
        )
    except ValueError as error:  # its message names the flag
        raise UsageError(str(error)) from error
