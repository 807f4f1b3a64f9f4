"""W8A8 simulation of this project's BERT / OPT models: the quantization points of quantization.md, in place.

No HF forward is copied. The wiring uses four mechanisms:
- module swaps that share the float parameters: every Linear, LayerNorm and Embedding (quantization/
  modules.py). The FFN activation (GELU / ReLU) is fused into the FFN-in Linear, so the pre-activation
  stays FP;
- quantizers swapped into the attention points `scores`, `probs` and `context` (attention.py);
- a forward pre-hook where a sum is a module's only input: BERT's two residual sums are the inputs of
  their LayerNorms, and OPT's embedding sum is the input of the first decoder layer;
- `SumQuantizers` where a sum feeds two consumers inside one forward: OPT's two residual sums per layer,
  and BERT's embedding sums (word + token type, then + position).
Gate networks stay FP, as do softmax arithmetic, mask addition, LayerNorm statistics, biases and the loss.
The preset decides whether the LM head (`cls` / `lm_head`) is quantized and which LayerNorms run at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from quantization.calibration import CALIBRATION_INPUTS
from quantization.config import HIGH_PRECISION_BITS, QUANT_PRESETS, QuantConfig
from quantization.estimators import PERCENTILE_INTERPOLATIONS
from quantization.modules import QuantEmbedding, QuantLayerNorm, QuantLinear
from quantization.quantizer import Quantizer
from quantization.sums import SumQuantizers

from .arguments import add_group, arg, parse_group
from .errors import UsageError
from .families import get_family


def _quantize_input(module: nn.Module, quantizer: Quantizer) -> None:
    """Quantize `module`'s first positional input, a sum made for it alone (so the quantizer may overwrite
    it); the quantizer is a child, so it is saved with the model."""
    module.input_quantizer = quantizer

    def hook(mod, args, kwargs):
        if args:
            return (mod.input_quantizer(args[0]), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": mod.input_quantizer(kwargs["hidden_states"])}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Insert every quantizer of `config` into `model` (in place; all start off: calibrate, then quantize)."""
    wiring = model.family.wiring
    preset = config.preset
    layers = model.transformer_layers()
    prefix = model.layers_path

    def weight_q(bits=None):
        return config.weight_quantizer(bits) if config.weight_quant else None

    def act_q(bits=None):
        return config.act_quantizer(bits) if config.act_quant else None

    final_layernorm = wiring.final_layernorm.format(last=len(layers) - 1)
    layernorms = [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    high_precision = {"none": set(), "final": {final_layernorm}, "all": set(layernorms)}[preset.int16_layernorms]

    fused = {}  # FFN-in Linear -> its activation, which moves into the quantized Linear
    for index, layer in enumerate(layers):
        fused[f"{prefix}.{index}.{wiring.ffn_in}"] = layer.get_submodule(wiring.ffn_activation)
        parent, _, attribute = wiring.ffn_activation.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attribute, nn.Identity())

    for name, module in list(model.named_modules()):
        in_head = name == wiring.head or name.startswith(wiring.head + ".")
        if (in_head and not preset.quantize_head) or ".attention_variant." in name:  # gates stay FP
            continue
        bits = HIGH_PRECISION_BITS if name in high_precision else None
        if isinstance(module, nn.Linear):
            swapped = QuantLinear.from_float(module, weight_q(), act_q(), activation=fused.get(name))
        elif isinstance(module, nn.LayerNorm):
            swapped = QuantLayerNorm.from_float(module, weight_q(bits), act_q(bits))
        elif isinstance(module, nn.Embedding):
            swapped = QuantEmbedding.from_float(module, weight_q())
        else:
            continue
        model.set_submodule(name, swapped)

    if config.act_quant:
        for variant in model.attention_variants().values():
            for point in ("scores", "probs", "context"):
                setattr(variant, point, config.act_quantizer())
        hidden = model.config.hidden_size
        for layer in layers:
            for path in wiring.residual_layernorms:
                _quantize_input(layer.get_submodule(path), config.act_quantizer())
            if wiring.residual_sums_in_layer:
                SumQuantizers([config.act_quantizer() for _ in range(wiring.residual_sums_in_layer)], hidden).attach(
                    layer
                )
        if wiring.embedding_sums is not None:
            SumQuantizers([config.act_quantizer(), config.act_quantizer()], hidden).attach(
                model.get_submodule(wiring.embedding_sums)
            )
        if wiring.embedding_sum_consumer is not None:
            _quantize_input(model.get_submodule(wiring.embedding_sum_consumer), config.act_quantizer())
    return model


CALIBRATION_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class QuantizationArgs:
    """The W8A8 flags of the paper's validation commands (each works for both model families); the defaults
    of the simulation itself are QuantConfig's."""

    quantize: bool = arg(False, "Evaluate the W8A8 (or --n_bits/--n_bits_act) model.", action="store_true")
    est_num_batches: int = arg(16, "Calibration batches for activation ranges.", type=int)
    per_device_train_batch_size: int = arg(
        8,
        "Sequences per calibration batch from the training split (the paper calibrated on training batches).",
        type=int,
    )
    n_bits: int = arg(QuantConfig.n_bits, "Weight bits.", type=int)
    n_bits_act: int = arg(QuantConfig.n_bits_act, "Activation bits.", type=int)
    no_weight_quant: bool = arg(False, "Keep the weights FP.", action="store_true")
    no_act_quant: bool = arg(False, "Keep the activations FP.", action="store_true")
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


def add_quantization_args(parser, ranges_weights: str) -> None:
    """The W8A8 group; `ranges_weights` is the family's weight estimator in the paper (BERT min-max, OPT MSE)."""
    add_group(parser, QuantizationArgs, "W8A8 simulation", {"ranges_weights": {"default": ranges_weights}})


def calibration_batch_size(args) -> int:
    """A calibration batch is a batch of the loader it comes from, as in the paper's code: training batches
    (--per_device_train_batch_size) from the training split, evaluation batches from the validation split."""
    return args.per_device_train_batch_size if args.calibration_split == "train" else args.per_device_eval_batch_size


QUANT_FIELDS = tuple(f.name for f in fields(QuantConfig) if f.name not in ("weight_quant", "act_quant"))


def quant_config_from_args(args) -> QuantConfig | None:
    """The QuantConfig of --quantize, or None; a W8A8 flag without --quantize is an error."""
    flags = parse_group(QuantizationArgs, args)
    if not flags.quantize:
        defaults = QuantizationArgs(ranges_weights=get_family(args.model_type).weight_ranges)
        changed = [f"--{f.name}" for f in fields(flags) if getattr(flags, f.name) != getattr(defaults, f.name)]
        if changed:
            raise UsageError(f"{', '.join(changed)} configure the W8A8 simulation: add --quantize, or drop them.")
        return None
    for flag in ("est_num_batches", "per_device_train_batch_size"):
        if getattr(flags, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(flags, flag)}.")
    try:
        return QuantConfig(
            weight_quant=not flags.no_weight_quant,
            act_quant=not flags.no_act_quant,
            **{f: getattr(flags, f) for f in QUANT_FIELDS},
        )
    except ValueError as error:  # its message names the flag
        raise UsageError(str(error)) from error
