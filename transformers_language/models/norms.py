"""The normalisation layers of the families, in one place: LayerNorm (BERT, OPT, ViT) and RMSNorm (Llama's, which
quantization/modules.py's QuantRMSNorm computes exactly). Code that treats norms alike (weight decay, telemetry,
16-bit norms, the W8A8 swap) asks here instead of naming nn.LayerNorm."""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

RMS_NORMS = (LlamaRMSNorm,)
NORMS = (nn.LayerNorm, *RMS_NORMS)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS)


def is_rms_norm(module: nn.Module) -> bool:
    return isinstance(module, RMS_NORMS)
