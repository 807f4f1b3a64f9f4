"""Pre-training BERT, OPT and ViT with attention variants that keep activations free of outliers."""

from .models.attention import ATTENTION_FUNCTION_NAME, AttentionVariant, install_attention_variant
from .models.attention_config import AttentionConfig, add_attention_args, attention_config_from_args
from .models.model_classes import (
    MODEL_CLASSES,
    BertForMaskedLMWithVariants,
    OPTForCausalLMWithVariants,
    ViTForImageClassificationWithVariants,
    build_model,
    model_class,
)

__all__ = [
    "ATTENTION_FUNCTION_NAME",
    "MODEL_CLASSES",
    "AttentionConfig",
    "AttentionVariant",
    "BertForMaskedLMWithVariants",
    "OPTForCausalLMWithVariants",
    "ViTForImageClassificationWithVariants",
    "add_attention_args",
    "attention_config_from_args",
    "build_model",
    "install_attention_variant",
    "model_class",
]
