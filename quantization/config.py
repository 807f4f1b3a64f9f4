"""What a W8A8 simulation quantizes, and how: typed settings from the paper's flags, and the presets.

`QuantConfig` holds the flag values (`--n_bits`, `--n_bits_act`, `--no_weight_quant`, `--no_act_quant`,
`--qmethod_acts`, `--ranges_weights`, `--ranges_acts`, `--percentile`, `--quant_setup`) and builds the
quantizers: weights symmetric (per tensor), activations asymmetric unless `--qmethod_acts
symmetric_uniform`. Presets say which parts of a model stay in floating point or run at 16 bits; the model
wiring decides which modules those parts are.
"""

from __future__ import annotations

from dataclasses import dataclass

from .affine import check_bits
from .calibration import CALIBRATION_INPUTS
from .estimators import PERCENTILE_INTERPOLATIONS
from .quantizer import Quantizer

ACT_METHODS = ("asymmetric_uniform", "symmetric_uniform")
# Flag spellings of the paper's scripts -> estimator registry names.
WEIGHT_RANGE_ALIASES = {"minmax": "current_minmax"}
HIGH_PRECISION_BITS = 16


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


@dataclass(frozen=True)
class QuantConfig:
    n_bits: int = 8
    n_bits_act: int = 8
    weight_quant: bool = True
    act_quant: bool = True
    qmethod_acts: str = "asymmetric_uniform"
    ranges_weights: str = "minmax"
    ranges_acts: str = "running_minmax"
    percentile: float | None = None
    percentile_interpolation: str = "linear"
    """How --percentile reads the sorted values: 'linear' (numpy.percentile, the paper's) or 'nearest' rank."""
    quant_setup: str = "fp32_head"
    calibration_inputs: str = "quantized"
    """What activation quantizers observe: 'quantized' upstream values (the paper's code) or 'float' ones."""

    def __post_init__(self):
        for flag in ("n_bits", "n_bits_act"):
            try:
                check_bits(getattr(self, flag))
            except ValueError as error:
                raise ValueError(f"--{flag} {getattr(self, flag)}: {error}") from error
        if self.qmethod_acts not in ACT_METHODS:
            raise ValueError(f"Unknown --qmethod_acts {self.qmethod_acts!r}; valid methods: {', '.join(ACT_METHODS)}.")
        for flag, valid in (
            ("percentile_interpolation", PERCENTILE_INTERPOLATIONS),
            ("calibration_inputs", CALIBRATION_INPUTS),
        ):
            if getattr(self, flag) not in valid:
                raise ValueError(f"Unknown --{flag} {getattr(self, flag)!r}; valid: {', '.join(valid)}.")
        if self.quant_setup not in QUANT_PRESETS:
            raise ValueError(f"Unknown --quant_setup {self.quant_setup!r}; valid presets: {', '.join(QUANT_PRESETS)}.")
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

    def weight_quantizer(self, n_bits: int | None = None) -> Quantizer:
        try:
            return Quantizer(n_bits or self.n_bits, symmetric=True, estimator=self.weight_estimator)
        except ValueError as error:
            raise ValueError(f"--ranges_weights: {error} (minmax is an alias of current_minmax)") from error

    def act_quantizer(self, n_bits: int | None = None) -> Quantizer:
        options = {}
        if self.percentile is not None:
            options = {"percentile": self.percentile, "interpolation": self.percentile_interpolation}
        symmetric = self.qmethod_acts == "symmetric_uniform"
        # Every activation point's input is a fresh intermediate read by nothing else: quantize it in place.
        return Quantizer(
            n_bits or self.n_bits_act, symmetric=symmetric, estimator=self.ranges_acts, in_place=True, **options
        )
