"""HF BERT masked-LM and OPT causal-LM classes that carry the attention variant of their config.

The classes subclass the stock HF ones and change three things: every self-attention module gets an
`AttentionVariant` child built from `config.attention_variant`, the attention implementation is always
this project's function (which itself uses torch SDPA whenever the variant allows), and weight init
initialises the gates deliberately (see gates.py), never with HF's generic Linear init. Stock checkpoints
load unchanged as vanilla models, and `save_pretrained` / `from_pretrained` round-trip every variant with
no missing or unexpected keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertForMaskedLM, OPTForCausalLM, PretrainedConfig
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.opt.modeling_opt import OPTAttention

from .attention import ATTENTION_FUNCTION_NAME, AttentionVariant, install_attention_variant
from .attention_config import AttentionConfig
from .errors import UsageError
from .gates import AttentionGate

# Implementations users may ask for that our function covers: its explicit path computes what HF's eager
# path computes, its fused path is HF's SDPA path.
_COVERED_IMPLEMENTATIONS = (None, "eager", "sdpa", ATTENTION_FUNCTION_NAME)


@dataclass(frozen=True)
class Site:
    """A named activation tensor of a model: a module's output, or the first input of a module (a residual sum
    that has no module of its own). Statistics hook here."""

    module_path: str
    kind: str
    """What the tensor is, the same for every layer (e.g. 'ffn_output'); headline figures select by kind."""
    layer: int | None
    tap: str = "output"

    @property
    def name(self) -> str:
        return self.module_path + ("[input]" if self.tap == "input" else "")


@dataclass(frozen=True)
class Headline:
    """A headline outlier figure: `reduce` ('max' or 'mean') of one statistic over the sites of some kinds."""

    key: str
    label: str
    """The paper's name for it, used in the log line."""
    statistic: str
    """'inf_norm' or 'kurtosis' (each the mean over validation sequences)."""
    kinds: tuple[str, ...] | None
    """Site kinds it covers; None: every site."""
    reduce: str = "max"


class AttentionVariantMixin:
    """Installs the attention variant of `config.attention_variant` on every `attention_class` module."""

    attention_class: type[nn.Module]
    layers_path: str
    """Where the transformer layers (whose outputs are the residual stream) live in the model."""
    layer_sites: tuple[tuple[str, str, str], ...]
    """Per layer, the measured tensors: (kind, module path inside the layer, 'output' or 'input')."""
    model_sites: tuple[tuple[str, str, str], ...] = ()
    """Measured tensors outside the layers: (kind, module path, tap)."""
    stream_kind: str
    """The kind of the residual stream after each layer (the rows of the outlier-dimension heatmap)."""
    headlines: tuple[Headline, ...]
    """The paper's headline figures for this family (metrics.md)."""

    def __init__(self, config: PretrainedConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.attention_config = AttentionConfig.from_model_config(config)
        self.attention_config.apply_to(config)
        num_heads = config.num_attention_heads
        head_dim = config.hidden_size // num_heads
        for module in self.modules():
            if isinstance(module, self.attention_class):
                install_attention_variant(
                    module, self.attention_config, num_heads, head_dim, is_causal=bool(module.is_causal)
                )
        # HF skips modules it already initialised, so this initialises only the new ones (a no-op on the meta
        # device, where from_pretrained loads them or initialises them later through initialize_weights).
        self.init_weights()

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs) -> str:
        if attn_implementation not in _COVERED_IMPLEMENTATIONS:
            raise ValueError(
                f"{type(self).__name__} always runs the '{ATTENTION_FUNCTION_NAME}' attention function (it uses "
                f"torch SDPA itself whenever the variant allows); attn_implementation={attn_implementation!r} "
                "is not supported: leave attn_implementation unset."
            )
        return ATTENTION_FUNCTION_NAME

    @torch.no_grad()
    def initialize_weights(self):
        """HF's init, then ours for the gates. Both `init_weights` and `from_pretrained`'s missing-key init come
        here. (HF dispatches each sub-model to its own stock `_init_weights`, so overriding `_init_weights`
        would never reach gates inside `self.bert` / `self.model`.) `reset_parameters` uses HF's guarded init
        functions: parameters loaded from a checkpoint keep their values."""
        super().initialize_weights()
        for module in self.modules():
            # Our own flag: HF's pass marks every module it visits as initialised, the gates included.
            if isinstance(module, AttentionGate) and not getattr(module, "_gate_initialized", False):
                module.reset_parameters()
                module._gate_initialized = True

    def transformer_layers(self) -> nn.ModuleList:
        """The encoder (BERT) or decoder (OPT) layers, in order."""
        return self.get_submodule(self.layers_path)

    def attention_variants(self) -> dict[str, AttentionVariant]:
        """Every layer's `AttentionVariant`, by module name (their `scores`, `probs`, `context` points are
        where metrics and quantizers attach)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, AttentionVariant)}

    def outlier_sites(self) -> list[Site]:
        """The tensors whose inf-norm, kurtosis and outliers are reported, layer by layer, in forward order."""
        sites = []
        for index in range(len(self.transformer_layers())):
            for kind, path, tap in self.layer_sites:
                module_path = ".".join(p for p in (self.layers_path, str(index), path) if p)
                sites.append(Site(module_path, kind, index, tap))
        sites += [Site(path, kind, None, tap) for kind, path, tap in self.model_sites]
        return sites


class BertForMaskedLMWithVariants(AttentionVariantMixin, BertForMaskedLM):
    """BERT masked LM whose self-attention uses `config.attention_variant`."""

    attention_class = BertSelfAttention
    layers_path = "bert.encoder.layer"
    _no_split_modules = ("BertLayer",)  # one shard unit per layer under FSDP (stock BERT names none)
    layer_sites = (
        ("ffn_output", "output.dense", "output"),
        ("ffn_residual_sum", "output.LayerNorm", "input"),  # FFN input + output
        ("ffn_layernorm", "output.LayerNorm", "output"),  # LN(FFN input + output): the layer output
    )
    stream_kind = "ffn_layernorm"
    headlines = (
        Headline("max_ffn_output_inf_norm", "max FFN output inf norm", "inf_norm", ("ffn_output",)),
        Headline("max_ffn_residual_sum_inf_norm", "max FFN input + output inf norm", "inf_norm", ("ffn_residual_sum",)),
        Headline("max_ffn_layernorm_inf_norm", "max LN(FFN i + o) inf norm", "inf_norm", ("ffn_layernorm",)),
        Headline("avg_kurtosis", "Avg Kurtosis", "kurtosis", ("ffn_output", "ffn_layernorm"), "mean"),
        Headline("max_kurtosis", "Max Kurtosis", "kurtosis", ("ffn_output", "ffn_layernorm")),
    )


class OPTForCausalLMWithVariants(AttentionVariantMixin, OPTForCausalLM):
    """OPT causal LM whose self-attention uses `config.attention_variant`."""

    attention_class = OPTAttention
    layers_path = "model.decoder.layers"
    layer_sites = (
        ("layer_output", "", "output"),  # the residual stream after the layer
        ("attn_layernorm", "self_attn_layer_norm", "output"),
        ("attn_out_proj", "self_attn.out_proj", "output"),
        ("ffn_layernorm", "final_layer_norm", "output"),
        ("ffn_output", "fc2", "output"),
    )
    model_sites = (("final_layernorm", "model.decoder.final_layer_norm", "output"),)
    stream_kind = "layer_output"
    headlines = (
        Headline("max_inf_norm", "Max inf norm", "inf_norm", None),
        Headline("max_ffn_inf_norm", "Max FFN inf norm", "inf_norm", ("ffn_output",)),
        Headline("max_layer_inf_norm", "Max layer inf norm", "inf_norm", ("layer_output",)),
        Headline("avg_kurtosis", "Avg Kurtosis", "kurtosis", None, "mean"),
        Headline("max_kurtosis", "Max Kurtosis", "kurtosis", None),
        Headline("max_kurtosis_layers", "Max Kurtosis layers", "kurtosis", ("layer_output",)),
    )


MODEL_CLASSES: dict[str, type] = {"bert": BertForMaskedLMWithVariants, "opt": OPTForCausalLMWithVariants}


def model_class(model_type: str) -> type:
    if model_type not in MODEL_CLASSES:
        raise UsageError(f"Unknown model type {model_type!r}; valid model types: {', '.join(MODEL_CLASSES)}.")
    return MODEL_CLASSES[model_type]


def build_model(config: PretrainedConfig, attention: AttentionConfig | None = None):
    """A freshly initialised model of `config.model_type`; `attention` (if given) is stored in the config."""
    if attention is not None:
        attention.apply_to(config)
    return model_class(config.model_type)(config)
