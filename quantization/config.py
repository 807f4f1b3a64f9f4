"""What a W8A8 simulation quantizes, and how: typed settings from the paper's flags, and the presets.

`QuantConfig` holds the flag values (`--n_bits`, `--n_bits_act`, `--no_weight_quant`, `--no_act_quant`,
`--qmethod_acts`, `--ranges_weights`, `--ranges_acts`, `--percentile`, `--quant_setup`, and the
post-training methods' granularity, per-point bit and LLM.int8() flags) and builds the quantizer of each
named point: weights symmetric, per tensor or per output channel; activations asymmetric unless
`--qmethod_acts symmetric_uniform`, per tensor, per embedding group (PEG, on the points matching
`peg_points`) or per token, with token-wise clipping ranges on the points matching `token_clipping_points`
(the PEG points excepted). `point_bits` puts the points matching a pattern (last rule wins) at their own
bit width. Patterns are dotted names where `*` stands for one name segment, `**` for any number of them and
`?` for one character of a segment: `model.decoder.layers.*.fc2.output` is every layer's fc2 output, and so
is `**.fc2.output`, while `**.output.dense.output` in BERT also matches `attention.output.dense.output`.
Presets say which parts of a model stay in floating point or run at 16 bits; the model
wiring decides which modules those parts are and names the points. Beyond the integer grid, `weight_format` /
`act_format` / `point_formats` put points on floating-point or block-scaled grids (float_quantizers.py),
`n_bits_kv` sets the key / value cache's bits, and `gptq` / `quarot` switch on GPTQ rounding and QuaRot's
rotations (their wiring lives with the models); format_checks.py refuses the combinations that make no sense.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache

from .affine import check_bits
from .calibration import CALIBRATION_INPUTS
from .decomposition import OutlierDecomposition
from .dynamic import TokenQuantizer
from .estimators import PERCENTILE_INTERPOLATIONS
from .float_quantizers import FORMAT_NAMES, INTEGER, NUMBER_FORMATS, NumberFormat
from .format_checks import check_formats
from .groups import GroupQuantizer
from .quantizer import Quantizer
from .token_clipping import DEFAULT_QUANTILES, TokenQuantileEstimator
from .transforms import TRANSFORMS
from .weight_groups import WeightGroupQuantizer

ACT_METHODS = ("asymmetric_uniform", "symmetric_uniform")
# Flag spellings of the paper's scripts -> estimator registry names.
WEIGHT_RANGE_ALIASES = {"minmax": "current_minmax"}
HIGH_PRECISION_BITS = 16
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
"""per_channel: one range per output row of a Linear or an embedding table (a LayerNorm's gamma stays per
tensor: one range per entry would leave nothing quantized); per_group: one per group of `weight_group_size`
input channels of each row."""
PER_EMBEDDING_GROUP = "per_embedding_group"
ACT_GRANULARITIES = ("per_tensor", PER_EMBEDDING_GROUP, "per_token")
"""per_embedding_group applies to the points matching `peg_points` (the rest stay per tensor); per_token to
every activation point."""


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcards = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def point_matches(name: str, pattern: str) -> bool:
    """Whether the point `name` matches `pattern` (`*`: one name segment, `**`: any, `?`: one character)."""
    return _pattern(pattern).fullmatch(name) is not None


@dataclass(frozen=True)
class QuantPreset:
    quantize_head: bool
    """Quantize the LM head (its weights and logits); otherwise it stays FP."""
    int16_layernorms: str
    """'none', 'final' (the LayerNorm feeding the head) or 'all': those LayerNorms run at 16 bits."""


QUANT_PRESETS = {
    "all": QuantPreset(quantize_head=True, int16_layernorms="none"),
    "fp32_head": QuantPreset(quantize_head=False, int16_layernorms="none"),
    "fp32_head+int16_final_LN": QuantPreset(quantize_head=False, int16_layernorms="final"),
    "fp32_head+int16_all_LN": QuantPreset(quantize_head=False, int16_layernorms="all"),
}


def setting(default, help: str, **flag):
    """A QuantConfig field that the validation scripts take as the flag `--<name>`: its help text and argparse
    options (`flag`) are declared here, once (transformers_language/ptq/quant_args.py reads them)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class QuantConfig:
    """The W8A8 simulation's settings. Fields made with `setting` are flags of the same name; the others come
    from flags that say it differently (--no_weight_quant, --peg_points, --point_bits, --llm_int8, the
    transform switches, --token_clipping)."""

    n_bits: int = setting(8, "Weight bits.", type=int)
    n_bits_act: int = setting(8, "Activation bits.", type=int)
    weight_quant: bool = True
    act_quant: bool = True
    qmethod_acts: str = setting("asymmetric_uniform", "asymmetric_uniform or symmetric_uniform.")
    ranges_weights: str = setting(
        "minmax", "Weight ranges: minmax, MSE or L<p> (e.g. L2.4); the default is the paper's for this family."
    )
    ranges_acts: str = setting("running_minmax", "Activation ranges: running_minmax, current_minmax, MSE, L<p>.")
    percentile: float | None = setting(None, "Min-max ranges from percentiles P / 100-P.", type=float)
    percentile_interpolation: str = setting(
        "linear",
        "How --percentile reads the sorted values: linear (numpy.percentile, the paper's) or nearest rank.",
        choices=list(PERCENTILE_INTERPOLATIONS),
    )
    quant_setup: str = setting("fp32_head", f"Preset: {', '.join(QUANT_PRESETS)}.")
    calibration_inputs: str = setting(
        "quantized",
        "What activation quantizers observe while calibrating: quantized upstream values (the paper's code) or "
        "float ones.",
        choices=list(CALIBRATION_INPUTS),
    )
    weight_granularity: str = setting(
        "per_tensor",
        "per_tensor; per_channel: one range per output row of each Linear and embedding table; per_group: one "
        "per --weight_group_size input channels of each row.",
        choices=list(WEIGHT_GRANULARITIES),
    )
    weight_group_size: int = setting(128, "per_group weights: input channels per group.", type=int)
    weight_format: str = setting(
        INTEGER,
        "Weights' number format: int (the integer grid of --n_bits); fp8_e4m3 / fp8_e5m2 (scaled per tensor or, "
        "with --weight_granularity per_channel, per row); mxfp8 / mxfp6 / mxfp4 / nvfp4 (block-scaled).",
        choices=list(FORMAT_NAMES),
    )
    act_format: str = setting(
        INTEGER,
        "Activations' number format (as --weight_format; fp8 scales calibrated per tensor). Points whose bits a "
        "rule or the preset sets (--point_bits, 16-bit LayerNorms) stay on the integer grid.",
        choices=list(FORMAT_NAMES),
    )
    n_bits_kv: int | None = setting(
        None,
        "Bits of the key / value cache points (the keys as the cache holds them, the value projection's output); "
        "default --n_bits_act. --point_bits rules still win.",
        type=int,
    )
    gptq: bool = setting(
        False,
        "GPTQ: round each quantized Linear's weight (integer grid) by GPTQ on the calibration batches' inputs "
        "instead of to nearest.",
        action="store_true",
    )
    gptq_block_size: int = setting(128, "GPTQ: columns per block of lazy updates.", type=int)
    gptq_damping: float = setting(0.01, "GPTQ: damping lambda as a fraction of the mean Hessian diagonal.", type=float)
    gptq_act_order: bool = setting(
        False, "GPTQ: round the input channels by descending Hessian diagonal (act-order).", action="store_true"
    )
    quarot: bool = setting(
        False,
        "QuaRot: rotate the float model by random Hadamard matrices (residual stream, FFN inner activation, "
        "heads) before quantizing; pre-norm models (OPT pre-LN, Llama).",
        action="store_true",
    )
    rotation_seed: int = setting(0, "QuaRot: seed of the residual stream's random signs.", type=int)
    act_granularity: str = setting(
        "per_tensor",
        "per_tensor; per_embedding_group (PEG, on --peg_points; the rest per tensor); per_token (every "
        "activation, dynamic ranges).",
        choices=list(ACT_GRANULARITIES),
    )
    peg_groups: int = setting(6, "PEG: embedding groups K per point.", type=int)
    peg_permute: bool = setting(
        False, "PEG: range-based permutation (group channels by calibrated range).", action="store_true"
    )
    peg_points: tuple[str, ...] = ()
    """Name patterns of the points quantized per embedding group."""
    point_bits: tuple[tuple[str, int], ...] = ()
    """(name pattern, bits) rules; the last rule matching a point sets its bits."""
    point_formats: tuple[tuple[str, str], ...] = ()
    """(name pattern, number format) rules; the last rule matching a point sets its format ('int': the grid)."""
    llm_int8_threshold: float | None = None
    """LLM.int8() decomposition in every quantized Linear at this |x| threshold (None: off). The Linear's input
    is then quantized per token inside it, its weight per output channel; no other activation is quantized."""
    transforms: tuple[str, ...] = ()
    """Equivalent transforms (transforms.TRANSFORMS) applied to the float model before quantizing, in that
    registry's order."""
    smoothquant_alpha: float = setting(0.5, "SmoothQuant's alpha in [0, 1].", type=float)
    os_plus_grid: int = setting(20, "OS+: candidate thresholds t per LayerNorm.", type=int)
    token_clipping_points: tuple[str, ...] = ()
    """Name patterns of the activation points whose ranges come from token-wise clipping."""
    token_clipping_quantiles: tuple[float, ...] = setting(
        DEFAULT_QUANTILES,
        "Token-wise clipping: the quantiles q searched (one value: that q, no search).",
        nargs="+",
        type=float,
        metavar="Q",
    )
    token_clipping_fine_steps: int = setting(
        0, "Token-wise clipping's fine stage: steps learning the clipping ranges on the same loss (0: off).", type=int
    )
    token_clipping_learning_rate: float = setting(
        1e-2, "Token-wise clipping's fine stage: Adam learning rate.", type=float
    )

    def changed(self, *names: str) -> list[str]:
        """The flags among `names` whose value is not the default."""
        return [f"--{f.name}" for f in fields(self) if f.name in names and getattr(self, f.name) != f.default]

    def __post_init__(self):
        for flag in ("n_bits", "n_bits_act", "n_bits_kv"):
            if getattr(self, flag) is None:  # n_bits_kv unset: the activations' bits
                continue
            try:
                check_bits(getattr(self, flag))
            except ValueError as error:
                raise ValueError(f"--{flag} {getattr(self, flag)}: {error}") from error
        if self.qmethod_acts not in ACT_METHODS:
            raise ValueError(f"Unknown --qmethod_acts {self.qmethod_acts!r}; valid methods: {', '.join(ACT_METHODS)}.")
        for flag, valid in (
            ("percentile_interpolation", PERCENTILE_INTERPOLATIONS),
            ("calibration_inputs", CALIBRATION_INPUTS),
            ("weight_granularity", WEIGHT_GRANULARITIES),
            ("act_granularity", ACT_GRANULARITIES),
            ("weight_format", FORMAT_NAMES),
            ("act_format", FORMAT_NAMES),
        ):
            if getattr(self, flag) not in valid:
                raise ValueError(f"Unknown --{flag} {getattr(self, flag)!r}; valid: {', '.join(valid)}.")
        if self.quant_setup not in QUANT_PRESETS:
            raise ValueError(f"Unknown --quant_setup {self.quant_setup!r}; valid presets: {', '.join(QUANT_PRESETS)}.")
        unknown = [name for name in self.transforms if name not in TRANSFORMS]
        if unknown:
            raise ValueError(f"Unknown equivalent transform {unknown[0]!r}; valid: {', '.join(TRANSFORMS)}.")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"--smoothquant_alpha lies in [0, 1], got {self.smoothquant_alpha}.")
        if self.os_plus_grid < 1:
            raise ValueError(f"--os_plus_grid must be positive, got {self.os_plus_grid}.")
        for quantile in self.token_clipping_quantiles:
            if not 0.5 < quantile <= 1.0:
                raise ValueError(f"--token_clipping_quantiles: each lies in (0.5, 1], got {quantile}.")
        if not self.token_clipping_quantiles:
            raise ValueError("--token_clipping_quantiles needs at least one quantile.")
        if self.token_clipping_fine_steps < 0 or not self.token_clipping_learning_rate > 0:
            raise ValueError("--token_clipping_fine_steps must be >= 0 and --token_clipping_learning_rate > 0.")
        if self.token_clipping_points and (self.act_granularity == "per_token" or self.llm_int8_threshold is not None):
            raise ValueError(
                "Token-wise clipping sets static activation ranges: it does not combine with per-token (dynamic) "
                "activations or --llm_int8."
            )
        check_formats(self)
        for flag in ("peg_groups", "weight_group_size"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be positive, got {getattr(self, flag)}.")
        for pattern, bits in self.point_bits:
            try:
                check_bits(bits)
            except ValueError as error:
                raise ValueError(f"--point_bits {pattern}={bits}: {error}") from error
        if self.llm_int8_threshold is not None:
            if math.isnan(self.llm_int8_threshold) or self.llm_int8_threshold < 0:
                raise ValueError(
                    f"--llm_int8_threshold must be >= 0 (inf: no decomposition), got {self.llm_int8_threshold}."
                )
            static = self.changed("act_granularity", "ranges_acts", "percentile", "calibration_inputs")
            if static or not self.act_quant:
                raise ValueError(
                    f"{', '.join(static or ['--no_act_quant'])} do not apply with --llm_int8: it quantizes each "
                    "Linear's input per token (dynamic) and no other activation."
                )
        if self.act_granularity == "per_token":
            static = self.changed("ranges_acts", "percentile", "calibration_inputs")
            if static:
                raise ValueError(f"{', '.join(static)} do not apply with --act_granularity per_token (dynamic ranges).")
        if self.weight_estimator == "running_minmax":
            raise ValueError(
                f"Unknown --ranges_weights {self.ranges_weights!r}; valid weight ranges: minmax, MSE, L<p> (e.g. L2.4)."
            )
        # Build once, so an unknown name or a percentile that does not apply fails before any model work.
        self.weight_quantizer()
        try:
            self.act_quantizer()
        except ValueError as error:
            flags = f"--ranges_acts {self.ranges_acts}" + (
                "" if self.percentile is None else f", --percentile {self.percentile:g}"
            )
            raise ValueError(f"{flags}: {error}") from error

    @property
    def weight_estimator(self) -> str:
        return WEIGHT_RANGE_ALIASES.get(self.ranges_weights, self.ranges_weights)

    @property
    def preset(self) -> QuantPreset:
        return QUANT_PRESETS[self.quant_setup]

    def bits(self, name: str, default: int) -> int:
        """The bit width of the point `name`: the last `point_bits` rule matching it, else `default`."""
        matching = [bits for pattern, bits in self.point_bits if point_matches(name, pattern)]
        return matching[-1] if matching else default

    def number_format(self, name: str, n_bits: int | None, default: str) -> NumberFormat | None:
        """The number format of the point `name` (None: the integer grid): the last --point_formats rule matching
        it, else the integer grid where the preset (`n_bits` given) or a --point_bits rule sets its bits, else
        `default` (--weight_format or --act_format)."""
        matching = [fmt for pattern, fmt in self.point_formats if point_matches(name, pattern)]
        if matching:
            return NUMBER_FORMATS.get(matching[-1])
        if n_bits is not None or any(point_matches(name, pattern) for pattern, _ in self.point_bits):
            return None
        return NUMBER_FORMATS.get(default)

    def is_peg_point(self, name: str) -> bool:
        return self.act_granularity == PER_EMBEDDING_GROUP and any(point_matches(name, p) for p in self.peg_points)

    def is_token_clipping_point(self, name: str) -> bool:
        return any(point_matches(name, p) for p in self.token_clipping_points)

    def weight_quantizer(self, name: str = "", n_bits: int | None = None, rows: bool = False) -> Quantizer:
        """The quantizer of the weight point `name`; `rows`: a weight with output rows (Linear, embedding), per
        channel under `weight_granularity` per_channel or LLM.int8()."""
        per_channel = rows and (self.weight_granularity == "per_channel" or self.llm_int8_threshold is not None)
        number_format = self.number_format(name, n_bits, self.weight_format)
        if number_format is not None:
            return number_format.quantizer(self.weight_estimator, axis=0 if per_channel else None)
        bits = self.bits(name, n_bits or self.n_bits)
        if rows and self.weight_granularity == "per_group":
            return WeightGroupQuantizer(bits, self.weight_group_size, self.weight_estimator)
        try:
            return Quantizer(
                bits,
                symmetric=True,
                estimator=self.weight_estimator,
                axis=0 if per_channel else None,
            )
        except ValueError as error:
            raise ValueError(f"--ranges_weights: {error} (minmax is an alias of current_minmax)") from error

    @property
    def symmetric_acts(self) -> bool:
        return self.qmethod_acts == "symmetric_uniform"

    def act_quantizer(self, name: str = "", n_bits: int | None = None) -> Quantizer:
        """The quantizer of the activation point `name` (its granularity and bits from the rules)."""
        options = {}
        if self.percentile is not None:
            options = {"percentile": self.percentile, "interpolation": self.percentile_interpolation}
        number_format = self.number_format(name, n_bits, self.act_format)
        if number_format is not None:
            return number_format.quantizer(self.ranges_acts, **options)
        bits = self.bits(name, n_bits or self.n_bits_act)
        # Every activation point's input is a fresh intermediate read by nothing else: quantize it in place.
        if self.act_granularity == "per_token":
            return TokenQuantizer(bits, symmetric=self.symmetric_acts, in_place=True)
        if self.is_peg_point(name):
            return GroupQuantizer(
                bits, self.symmetric_acts, self.ranges_acts, self.peg_groups, self.peg_permute, True, **options
            )
        if self.is_token_clipping_point(name):  # starts at q = 1; the search sets the quantile
            estimator = TokenQuantileEstimator(bits, self.symmetric_acts, None)
            return Quantizer(bits, symmetric=self.symmetric_acts, estimator=estimator, in_place=True)
        return Quantizer(bits, symmetric=self.symmetric_acts, estimator=self.ranges_acts, in_place=True, **options)

    def decomposition(self, name: str = "") -> OutlierDecomposition | None:
        """LLM.int8()'s decomposition for the Linear `name` (its input point is `name` + '.input'), or None."""
        if self.llm_int8_threshold is None:
            return None
        input_bits = self.bits(f"{name}.input", self.n_bits_act)
        return OutlierDecomposition(TokenQuantizer(input_bits, self.symmetric_acts), self.llm_int8_threshold)
