"""The post-training recipes compared side by side (scripts/compare_quantization.py, benchmarks/bench_quantize.py,
the tests): each a name, a label for tables and its `validate_*.py` flags; and the bit settings by their usual
names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from quantization.config import PER_EMBEDDING_GROUP
from quantization.float_quantizers import NUMBER_FORMATS


@dataclass(frozen=True)
class PTQMethod:
    """A post-training recipe: its name in tables and its `validate_*.py` flags."""

    label: str
    flags: tuple[str, ...]
    act_flags: tuple[str, ...] = ()
    """Flags of its activation quantization, dropped at settings that leave activations in floating point."""
    weight_only: bool = False
    """Whether it has a meaning with floating-point activations (it runs at W4A16)."""
    number_format: str | None = None
    """A recipe of a number format (NUMBER_FORMATS) for weights and activations: it runs only at the settings of
    that format's bits."""

    def fits(self, setting: BitSetting) -> bool:
        if setting.acts is None and not self.weight_only:
            return False
        if self.number_format is None:
            return True
        bits = NUMBER_FORMATS[self.number_format].bits
        return setting.weights == setting.acts == bits and setting.kv in (None, bits)

    def validate_flags(self, setting: BitSetting) -> list[str]:
        """Its flags at `setting`, the bit widths first (in the order the comparison's run records were written
        with, so `--resume` reads them back)."""
        flags = ["--quantize", "--n_bits", str(setting.weights)]
        if setting.acts is None:
            return [*flags, *self.flags, "--no_act_quant"]
        flags += ["--n_bits_act", str(setting.acts), *self.flags, *self.act_flags]
        if setting.kv is not None and self.number_format is None:
            flags += ["--n_bits_kv", str(setting.kv)]
        return flags


# The rotation papers' round-to-nearest baseline: symmetric per-token activations, per-channel weights.
PER_TOKEN_SYMMETRIC = ("--act_granularity", "per_token", "--qmethod_acts", "symmetric_uniform")

# The post-training recipes side by side (scripts/compare_quantization.py, benchmarks/bench_quantize.py).
PTQ_METHODS = {
    "per_tensor": PTQMethod("per-tensor", (), weight_only=True),
    "per_channel": PTQMethod("per-channel W", ("--weight_granularity", "per_channel"), weight_only=True),
    "peg": PTQMethod("PEG K=6 perm.", ("--act_granularity", PER_EMBEDDING_GROUP, "--peg_groups", "6", "--peg_permute")),
    "mp_ptq": PTQMethod("MP-PTQ", ("--point_bits", "MP-PTQ")),
    "per_token": PTQMethod("per-token", ("--act_granularity", "per_token", "--weight_granularity", "per_channel")),
    "llm_int8": PTQMethod("LLM.int8()", ("--llm_int8",)),
    # Outlier Suppression's recipe: gamma migration, token-wise clipping, per-channel weights.
    "os": PTQMethod("OS", ("--gamma_migration", "--token_clipping", "--weight_granularity", "per_channel")),
    "smoothquant": PTQMethod("SmoothQuant", ("--smoothquant", "--weight_granularity", "per_channel")),
    "os_plus": PTQMethod("OS+", ("--os_plus", "--weight_granularity", "per_channel")),
    "rtn": PTQMethod("RTN", ("--weight_granularity", "per_channel"), PER_TOKEN_SYMMETRIC, weight_only=True),
    "gptq": PTQMethod(
        "GPTQ", ("--weight_granularity", "per_channel", "--gptq", "--gptq_act_order"), PER_TOKEN_SYMMETRIC, True
    ),
    "quarot": PTQMethod(
        "QuaRot", ("--quarot", "--weight_granularity", "per_channel"), PER_TOKEN_SYMMETRIC, weight_only=True
    ),
    "quarot_gptq": PTQMethod(
        "QuaRot+GPTQ",
        ("--quarot", "--weight_granularity", "per_channel", "--gptq", "--gptq_act_order"),
        PER_TOKEN_SYMMETRIC,
        weight_only=True,
    ),
    "fp8": PTQMethod(
        "FP8 E4M3",
        ("--weight_format", "fp8_e4m3", "--weight_granularity", "per_channel"),
        ("--act_format", "fp8_e4m3"),
        number_format="fp8_e4m3",
    ),
    "mxfp4": PTQMethod("MXFP4", ("--weight_format", "mxfp4"), ("--act_format", "mxfp4"), number_format="mxfp4"),
}


class BitSetting(NamedTuple):
    """Weight bits, activation bits (None: activations stay in floating point) and KV-cache bits (None: those of
    the activations)."""

    weights: int
    acts: int | None
    kv: int | None = None


# Bit settings by their usual names.
BIT_SETTINGS = {
    "W8A8": BitSetting(8, 8),
    "W6A8": BitSetting(6, 8),
    "W6A6": BitSetting(6, 6),
    "W4A8": BitSetting(4, 8),
    "W4A4KV4": BitSetting(4, 4, 4),
    "W4A16": BitSetting(4, None),
}
