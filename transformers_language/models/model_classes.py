"""HF BERT (masked LM, GLUE), OPT and Llama (causal LM) and ViT classes that carry the attention variant of their
config.

The classes subclass the stock HF ones and change three things: every self-attention module gets an
`AttentionVariant` child built from `config.attention_variant`, the attention implementation is always
this project's function (which itself uses torch SDPA whenever the variant allows), and weight init
initialises the gates deliberately (see gates.py), never with HF's generic Linear init. A model saved after
an equivalent transform (equivalent_transforms.py) rebuilds the shortcut affines its config names. Stock checkpoints
load unchanged as vanilla models, and `save_pretrained` / `from_pretrained` round-trip every variant with
no missing or unexpected keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    LlamaForCausalLM,
    OPTForCausalLM,
    PretrainedConfig,
    ViTForImageClassification,
)
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.opt.modeling_opt import OPTAttention
from transformers.models.vit.modeling_vit import ViTAttention

from ..errors import UsageError
from ..families import FAMILIES, Family, Headline, get_family
from ..wiring import Site
from .attention import ATTENTION_FUNCTION_NAME, AttentionVariant, install_attention_variant
from .attention_config import AttentionConfig
from .gates import AttentionGate
from .norm_sites import CONFIG_KEY as TRANSFORMS_KEY
from .norm_sites import install_shortcut_affines
from .prepended_keys import BiasKeyValue
from .softmax import LearnedSink

# The variants' own parameter modules: initialised by their `reset_parameters`, never by HF's generic init.
_VARIANT_PARAMETER_MODULES = (AttentionGate, LearnedSink, BiasKeyValue)
# Implementations users may ask for that our function covers: its explicit path computes what HF's eager
# path computes, its fused path is HF's SDPA path.
_COVERED_IMPLEMENTATIONS = (None, "eager", "sdpa", ATTENTION_FUNCTION_NAME)


class AttentionVariantMixin:
    """Installs the attention variant of `config.attention_variant` on every `attention_class` module. Where
    the layers and the measured tensors are, and the headline figures, come from the class's `family`."""

    attention_class: type[nn.Module]
    family: Family

    @property
    def layers_path(self) -> str:
        return self.family.layers_path

    @property
    def stream_kind(self) -> str:
        return self.family.stream_kind

    @property
    def headlines(self) -> tuple[Headline, ...]:
        return self.family.headlines

    def __init__(self, config: PretrainedConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.attention_config = AttentionConfig.from_model_config(config)
        self.attention_config.apply_to(config)
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        if self.attention_config.gated and head_dim * num_heads != config.hidden_size:
            raise UsageError(
                f"The attention gates read the attention input in {num_heads} slices of head_dim={head_dim}, but the "
                f"hidden size is {config.hidden_size}; use a config with head_dim x heads = hidden size, or no gate."
            )
        for module in self.modules():
            if isinstance(module, self.attention_class):
                install_attention_variant(
                    module, self.attention_config, num_heads, head_dim, bool(module.is_causal), num_kv_heads
                )
        self.add_family_modules(config)
        if getattr(config, TRANSFORMS_KEY, None):  # a transformed model: its shortcut affines load with it
            install_shortcut_affines(self)
        # HF skips modules it already initialised, so this initialises only the new ones (a no-op on the meta
        # device, where from_pretrained loads them or initialises them later through initialize_weights).
        self.init_weights()

    def add_family_modules(self, config: PretrainedConfig) -> None:
        """Modules a family adds from its config (built before weights load or are initialised)."""

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
        """HF's init, then ours for the gates, sinks and learned keys / values. Both `init_weights` and
        `from_pretrained`'s missing-key init come here. (HF dispatches each sub-model to its own stock
        `_init_weights`, so overriding `_init_weights` would never reach modules inside `self.bert` /
        `self.model`.) `reset_parameters` uses HF's guarded init functions: loaded parameters keep their values."""
        super().initialize_weights()
        for module in self.modules():
            # Our own flag: HF's pass marks every module it visits as initialised, these included.
            if isinstance(module, _VARIANT_PARAMETER_MODULES) and not getattr(module, "_variant_initialized", False):
                module.reset_parameters()
                module._variant_initialized = True

    def body_output(self, inputs) -> torch.Tensor:
        """The transformer body's last hidden state (what the head reads), without a KV cache. `inputs`: the
        token ids, or a mapping of the body's inputs (a padded batch: input_ids, attention_mask, ...)."""
        kwargs = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        return self.base_model(**kwargs, use_cache=False).last_hidden_state

    def _input_width(self, module_path: str, tap: str) -> int | None:
        """A Linear's input width when a site is that input (Llama's SwiGLU product), else None: the hidden size."""
        module = self.get_submodule(module_path)
        return module.in_features if tap == "input" and isinstance(module, nn.Linear) else None

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
            for kind, path, tap in self.family.layer_sites:
                module_path = ".".join(p for p in (self.layers_path, str(index), path) if p)
                sites.append(Site(module_path, kind, index, tap, self._input_width(module_path, tap)))
        sites += [Site(path, kind, None, tap) for kind, path, tap in self.family.model_sites]
        return sites


class BertForMaskedLMWithVariants(AttentionVariantMixin, BertForMaskedLM):
    """BERT masked LM whose self-attention uses `config.attention_variant`."""

    attention_class = BertSelfAttention
    family = FAMILIES["bert"]
    _no_split_modules = ("BertLayer",)  # one shard unit per layer under FSDP (stock BERT names none)


class BertForSequenceClassificationWithVariants(AttentionVariantMixin, BertForSequenceClassification):
    """BERT sentence(-pair) classifier or regressor (GLUE) whose self-attention uses `config.attention_variant`.
    It loads any BERT checkpoint: this project's masked LMs of any variant, or a stock `BertModel` (the pooler and
    classifier a checkpoint lacks are initialised)."""

    attention_class = BertSelfAttention
    family = FAMILIES["bert_glue"]
    _no_split_modules = ("BertLayer",)


class OPTForCausalLMWithVariants(AttentionVariantMixin, OPTForCausalLM):
    """OPT causal LM whose self-attention uses `config.attention_variant`."""

    attention_class = OPTAttention
    family = FAMILIES["opt"]


class LlamaForCausalLMWithVariants(AttentionVariantMixin, LlamaForCausalLM):
    """Llama-style causal LM (pre-RMSNorm, SwiGLU, RoPE, grouped-query attention) whose self-attention uses
    `config.attention_variant`. The gates and the softmax's logits are per query head; the learned key/value is
    per key-value head (attention.py)."""

    attention_class = LlamaAttention
    family = FAMILIES["llama"]


PATCH_LAYERNORM_KEY = "patch_embedding_layernorm"  # config.json: a LayerNorm after the patch embedding
EXTRA_CONFIG_KEYS = (PATCH_LAYERNORM_KEY,)  # config keys our classes read beyond HF's (YAML overrides may set them)


def _normalise_patches(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.norm(output)


class ViTForImageClassificationWithVariants(AttentionVariantMixin, ViTForImageClassification):
    """ViT image classifier whose self-attention uses `config.attention_variant`. With
    `config.patch_embedding_layernorm`, a LayerNorm normalises the patch embeddings before the [CLS] token and the
    position embeddings join them (the paper's clipped and gated ViT runs use it)."""

    attention_class = ViTAttention
    family = FAMILIES["vit"]

    def add_family_modules(self, config: PretrainedConfig) -> None:
        if getattr(config, PATCH_LAYERNORM_KEY, False):
            patches = self.vit.embeddings.patch_embeddings
            patches.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            patches.register_forward_hook(_normalise_patches)

    def body_output(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.base_model(pixel_values=pixel_values).last_hidden_state


# Keyed by the family each class names (families.py holds the list of families).
MODEL_CLASSES: dict[str, type] = {
    cls.family.name: cls
    for cls in (
        BertForMaskedLMWithVariants,
        BertForSequenceClassificationWithVariants,
        OPTForCausalLMWithVariants,
        ViTForImageClassificationWithVariants,
        LlamaForCausalLMWithVariants,
    )
}


def model_class(family: str) -> type:
    """The class of a family (families.py; a model type names its pre-training family)."""
    return MODEL_CLASSES[get_family(family).name]


def family_of_config(config: PretrainedConfig) -> Family:
    """The family of a saved model: a GLUE task in its config makes a BERT the GLUE family's."""
    task_family = next((f for f in FAMILIES.values() if f.config_marker and hasattr(config, f.config_marker)), None)
    if task_family is not None and task_family.model_type == config.model_type:
        return task_family
    return get_family(config.model_type)


def build_model(config: PretrainedConfig, attention: AttentionConfig | None = None, family: str | None = None):
    """A freshly initialised model of `family` (default: the config's); `attention` (if given) is stored in the
    config."""
    if attention is not None:
        attention.apply_to(config)
    return model_class(family or family_of_config(config).name)(config)
