"""W8A8 simulation of this project's BERT / OPT / ViT / Llama models: the quantization points of quantization.md,
in place.

No HF forward is copied. The wiring uses four mechanisms:
- module swaps that share the float parameters: every Linear, LayerNorm / RMSNorm and Embedding
  (quantization/modules.py). The FFN activation (GELU / ReLU; Llama: the SiLU of the gate projection) is
  fused into the FFN-in Linear, so the pre-activation stays FP;
- quantizers swapped into the attention points `scores`, `probs` and `context` (attention.py), and for Llama
  `keys` (the RoPE'd keys the KV cache holds);
- a forward pre-hook where a sum or product is a module's only input: BERT's two residual sums are the inputs
  of their LayerNorms, OPT's embedding sum is the input of the first decoder layer, and Llama's SwiGLU
  product act(gate) * up is the input of the down projection;
- `SumQuantizers` where a sum feeds two consumers inside one forward: OPT's and Llama's two residual sums per
  layer, and BERT's embedding sums (word + token type, then + position).
Gate networks stay FP, as do softmax arithmetic, mask addition, LayerNorm statistics, biases and the loss.
The preset decides whether the LM head (`cls` / `lm_head`) is quantized and which LayerNorms run at 16 bits.

Every quantizer has a public point name, which the per-point flags match and the results use:
  <module>.weight          a Linear's, LayerNorm's (gamma) or Embedding's weight
  <module>.output          a Linear's output (after a fused FFN activation) or a norm's output
  <module>.input           a residual or embedding sum, or the SwiGLU product, that is the module's only input;
                           under LLM.int8(), a Linear's input, quantized inside it
  <attention>.scores / .probs / .context   the attention points (<attention> ends in `attention_variant`)
  <attention>.keys         Llama: the RoPE'd keys, the key cache (with v_proj.output, the value cache)
  <layer>.attn_residual_sum / .ffn_residual_sum   OPT's and Llama's residual sums
  bert.embeddings.word_type_sum / .embedding_sum  BERT's embedding sums
`validate_*.py --list_quant_points` prints them for a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from quantization.config import HIGH_PRECISION_BITS, PER_EMBEDDING_GROUP, QuantConfig, point_matches
from quantization.dynamic import TokenQuantizer
from quantization.float_quantizers import INTEGER, BlockQuantizer
from quantization.groups import GroupQuantizer
from quantization.modules import QuantEmbedding, QuantLayerNorm, QuantLinear, QuantRMSNorm
from quantization.quantizer import Quantizer
from quantization.sums import SumQuantizers
from quantization.weight_groups import WeightGroupQuantizer

from ..errors import UsageError
from ..models.model_classes import family_of_config, model_class
from ..models.norms import is_norm, is_rms_norm

ATTENTION_CHANNELLESS = (".scores", ".probs")  # their last dimension is the key positions, not channels


def _quantize_input(module: nn.Module, quantizer: Quantizer) -> None:
    """Quantize `module`'s first positional input, a sum made for it alone (so the quantizer may overwrite
    it); the quantizer is a child, so it is saved with the model."""
    module.input_quantizer = quantizer

    def hook(mod, args, kwargs):
        if args:
            return (mod.input_quantizer(args[0]), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": mod.input_quantizer(kwargs["hidden_states"])}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def high_precision_layernorms(model: nn.Module, preset) -> set[str]:
    """The LayerNorms (model paths) that `preset` runs at 16 bits."""
    if preset.int16_layernorms == "final":
        return {model.family.wiring.final_layernorm.format(last=len(model.transformer_layers()) - 1)}
    if preset.int16_layernorms == "all":
        return {name for name, module in model.named_modules() if is_norm(module)}
    return set()


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Insert every quantizer of `config` into `model` (in place; all start off: calibrate, then quantize).
    Each gets its public point name (the module docstring), recorded in `model.quantization_points`."""
    wiring = model.family.wiring
    preset = config.preset
    layers = model.transformer_layers()
    prefix = model.layers_path
    points: dict[str, Quantizer] = {}
    decomposed = config.llm_int8_threshold is not None  # LLM.int8(): only the Linears, inputs quantized inside

    def named(name: str, quantizer: Quantizer) -> Quantizer:
        points[name] = quantizer
        return quantizer

    def weight_q(module_name, bits=None, rows=True):
        if not config.weight_quant:
            return None
        return named(f"{module_name}.weight", config.weight_quantizer(f"{module_name}.weight", bits, rows=rows))

    kv_cache = {f"{prefix}.{index}.{point}" for index in range(len(layers)) for point in wiring.kv_points}

    def act_q(name, bits=None):
        if not config.act_quant or decomposed:
            return None
        if bits is None and name in kv_cache:
            bits = config.n_bits_kv
        return named(name, config.act_quantizer(name, bits))

    high_precision = high_precision_layernorms(model, preset)

    fused = {}  # FFN-in Linear -> its activation, which moves into the quantized Linear
    for index, layer in enumerate(layers):
        fused[f"{prefix}.{index}.{wiring.ffn_in}"] = layer.get_submodule(wiring.ffn_activation)
        parent, _, attribute = wiring.ffn_activation.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attribute, nn.Identity())

    for name, module in list(model.named_modules()):
        if (wiring.in_head(name) and not preset.quantize_head) or ".attention_variant." in name:  # gates stay FP
            continue
        bits = HIGH_PRECISION_BITS if name in high_precision else None
        if isinstance(module, nn.Linear):
            decomposition = config.decomposition(name) if config.act_quant else None
            if decomposition is not None:
                named(f"{name}.input", decomposition.input_quantizer)
            swapped = QuantLinear.from_float(
                module, weight_q(name), act_q(f"{name}.output"), fused.get(name), decomposition
            )
        elif decomposed:  # LLM.int8() quantizes the Linears alone, as bitsandbytes does
            continue
        elif is_norm(module):
            norm_class = QuantRMSNorm if is_rms_norm(module) else QuantLayerNorm
            swapped = norm_class.from_float(module, weight_q(name, bits, rows=False), act_q(f"{name}.output", bits))
        elif isinstance(module, nn.Embedding):
            swapped = QuantEmbedding.from_float(module, weight_q(name))
        else:
            continue
        model.set_submodule(name, swapped)

    if config.act_quant and not decomposed:
        for path, variant in model.attention_variants().items():
            for point in wiring.attention_points:
                setattr(variant, point, act_q(f"{path}.{point}"))
        hidden = model.config.hidden_size
        for index, layer in enumerate(layers):
            for path in (*wiring.residual_layernorms, *wiring.product_inputs):
                _quantize_input(layer.get_submodule(path), act_q(f"{prefix}.{index}.{path}.input"))
            if wiring.residual_sums:
                sums = [act_q(f"{prefix}.{index}.{sum_name}") for sum_name in wiring.residual_sums]
                SumQuantizers(sums, hidden).attach(layer)
        if wiring.embedding_sums is not None:
            sums = [act_q(f"{wiring.embedding_sums}.{sum_name}") for sum_name in wiring.embedding_sum_names]
            SumQuantizers(sums, hidden).attach(model.get_submodule(wiring.embedding_sums))
        if wiring.embedding_sum_consumer is not None:
            consumer = wiring.embedding_sum_consumer
            _quantize_input(model.get_submodule(consumer), act_q(f"{consumer}.input"))
    model.quantization_points = points
    return model


def outlier_point_patterns(family) -> tuple[str, ...]:
    """The name patterns of the seed's three outlier tensors in every layer of `family` (PEG's and MP-PTQ's)."""
    return tuple(f"{family.layers_path}.*.{point}" for point in family.wiring.outlier_points)


def describe_points(model: nn.Module) -> list[dict]:
    """Each quantization point of a quantized model: name, what it quantizes, bits and granularity."""
    rows = []
    for name, quantizer in model.quantization_points.items():
        number_format = getattr(quantizer, "format_name", INTEGER)
        if isinstance(quantizer, TokenQuantizer):
            granularity = "per_token"
        elif isinstance(quantizer, BlockQuantizer):
            granularity = f"per_block({quantizer.format.block_size})"
        elif isinstance(quantizer, WeightGroupQuantizer):
            granularity = f"per_group({quantizer.group_size})"
        elif isinstance(quantizer, GroupQuantizer):
            granularity = f"per_embedding_group(K={quantizer.groups}{', permuted' if quantizer.permute else ''})"
        else:
            granularity = "per_tensor" if quantizer.axis is None else "per_channel"
        kind = "weight" if name.endswith(".weight") else "activation"
        row = {"name": name, "kind": kind, "bits": quantizer.n_bits, "granularity": granularity}
        rows.append(row | {"format": number_format})
    return rows


def llm_int8_shares(model: nn.Module, reduce=None) -> dict[str, float]:
    """The share of input channels each decomposed Linear kept in floating point, by Linear name; `reduce`
    (e.g. a sum over processes) maps the stacked (Linears, 2) counts before the division."""
    linears = [(name, m) for name, m in model.named_modules() if getattr(m, "decomposition", None) is not None]
    if not linears:
        return {}
    counts = torch.stack([module.decomposition.counts for _, module in linears])
    counts = counts if reduce is None else reduce(counts)
    shares = {}
    for (name, module), linear_counts in zip(linears, counts, strict=True):
        share = module.decomposition.float_channel_share(module.in_features, linear_counts)
        if share is not None:
            shares[name] = share
    return shares


def _channels(model, point: str) -> int:
    """The last dimension of the activation at `point`: a Linear's or norm's width (a Linear's input: its input
    width), else the hidden size."""
    if point.endswith(".output"):
        module = model.get_submodule(point.removesuffix(".output"))
        return getattr(module, "out_features", None) or module.weight.shape[-1]
    if point.endswith(".input"):
        module = model.get_submodule(point.removesuffix(".input"))
        if isinstance(module, nn.Linear):
            return module.in_features
    return model.config.hidden_size


def planned_points(config, quantization: QuantConfig, family: str | None = None) -> list[dict]:
    """The quantization points (describe_points) of the model of `config` under `quantization`, from a build on
    the meta device; a --point_bits or --peg_points pattern that matches no point, or PEG on a tensor that has
    no channels to group, is an error here, before any weights load."""
    with torch.device("meta"):
        model = model_class(family or family_of_config(config).name)(config)
    rows = describe_points(quantize_model(model, quantization))
    names = [row["name"] for row in rows]
    activations = [row["name"] for row in rows if row["kind"] == "activation"]
    patterns = [("--point_bits", pattern, names) for pattern, _ in quantization.point_bits]
    patterns += [("--point_formats", pattern, names) for pattern, _ in quantization.point_formats]
    patterns += [("--peg_points", pattern, names) for pattern in quantization.peg_points]
    patterns += [("--token_clipping_points", pattern, activations) for pattern in quantization.token_clipping_points]
    for flag, pattern, candidates in patterns:
        if not any(point_matches(name, pattern) for name in candidates):
            kind = "activation " if candidates is activations else ""
            raise UsageError(
                f"{flag} {pattern!r} matches no {kind}quantization point of this model; --list_quant_points prints "
                "them."
            )
    for row in rows:
        if row["granularity"].startswith("per_group"):
            columns = model.get_submodule(row["name"].removesuffix(".weight")).weight.shape[-1]
            if columns % quantization.weight_group_size:
                raise UsageError(
                    f"--weight_group_size {quantization.weight_group_size}: groups of {quantization.weight_group_size}"
                    f" do not divide the {columns} input channels of {row['name']}; choose a divisor."
                )
        if row["granularity"].startswith(PER_EMBEDDING_GROUP):
            if row["kind"] == "weight" or row["name"].endswith(ATTENTION_CHANNELLESS):
                raise UsageError(
                    f"--peg_points: {row['name']} has no embedding channels to group (PEG groups the hidden "
                    "channels of an activation); narrow the pattern."
                )
            channels = _channels(model, row["name"])
            if quantization.peg_groups > channels:
                raise UsageError(
                    f"--peg_groups {quantization.peg_groups} exceeds the {channels} channels of {row['name']}."
                )
    return rows
