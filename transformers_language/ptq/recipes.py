"""The post-training recipes compared side by side (scripts/compare_quantization.py, benchmarks/bench_quantize.py,
the tests): each a name, a label for tables and its `validate_*.py` flags; and the bit settings by their usual
names."""

from __future__ import annotations

from dataclasses import dataclass

from quantization.config import PER_EMBEDDING_GROUP


@dataclass(frozen=True)
class PTQMethod:
    """A post-training recipe: its name in tables and its `validate_*.py` flags."""

    label: str
    flags: tuple[str, ...]


# The post-training recipes side by side (scripts/compare_quantization.py, benchmarks/bench_quantize.py).
PTQ_METHODS = {
    "per_tensor": PTQMethod("per-tensor", ()),
    "per_channel": PTQMethod("per-channel W", ("--weight_granularity", "per_channel")),
    "peg": PTQMethod("PEG K=6 perm.", ("--act_granularity", PER_EMBEDDING_GROUP, "--peg_groups", "6", "--peg_permute")),
    "mp_ptq": PTQMethod("MP-PTQ", ("--point_bits", "MP-PTQ")),
    "per_token": PTQMethod("per-token", ("--act_granularity", "per_token", "--weight_granularity", "per_channel")),
    "llm_int8": PTQMethod("LLM.int8()", ("--llm_int8",)),
    # Outlier Suppression's recipe: gamma migration, token-wise clipping, per-channel weights.
    "os": PTQMethod("OS", ("--gamma_migration", "--token_clipping", "--weight_granularity", "per_channel")),
    "smoothquant": PTQMethod("SmoothQuant", ("--smoothquant", "--weight_granularity", "per_channel")),
    "os_plus": PTQMethod("OS+", ("--os_plus", "--weight_granularity", "per_channel")),
}
# Bit settings by their usual names -> (--n_bits, --n_bits_act).
BIT_SETTINGS = {"W8A8": (8, 8), "W6A8": (6, 8), "W6A6": (6, 6), "W4A8": (4, 8)}
