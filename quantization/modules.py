"""Quantized Linear / LayerNorm / RMSNorm / Embedding, made from float modules and sharing their parameters.

Each is a subclass of the float module whose parameters are the float module's own Parameter objects, so
a swap changes no weight, the state dict keeps the float keys (plus the quantizers' buffers), and an
optimizer over the float model still reaches them. The weight quantizer fake-quantizes the weight (a
LayerNorm's gamma; beta and biases stay FP). The output quantizer fake-quantizes the module's output, for
a Linear after an optional fused activation, so the pre-activation stays FP. A Linear may instead
decompose its matmul LLM.int8()-style (decomposition.py): its input is then quantized inside it. With frozen
ranges the quantized weight is computed once and reused until the weight changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .decomposition import OutlierDecomposition
from .quantizer import Quantizer


class _QuantizedWeight:
    """Mixin: `quantized_weight()` with a cache that is valid while the weight and its range are unchanged."""

    weight: nn.Parameter
    weight_quantizer: Quantizer | None

    def quantized_weight(self) -> torch.Tensor:
        quantizer = self.weight_quantizer
        if quantizer is None or quantizer.mode == "off":
            return self.weight
        if quantizer.mode == "observe" or torch.is_grad_enabled():
            return quantizer(self.weight)
        key = (self.weight._version, self.weight.data_ptr(), quantizer.scale.data_ptr(), quantizer.scale._version)
        cached = getattr(self, "_weight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, quantizer(self.weight).detach())
            self._weight_cache = cached
        return cached[1]


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _adopt(cls: type, source: nn.Module, own_forward: bool = False) -> nn.Module:
    """Turn a copy of `source` into `cls` sharing every parameter and buffer (no tensor is copied). A source
    of a subclass (e.g. OPT's learned positional embedding, whose forward offsets the positions and then
    calls nn.Embedding.forward) becomes a subclass of both, so its own forward runs and reaches ours; with
    `own_forward`, `cls`'s forward runs instead (a module of another library computing the same function)."""
    source_type = type(source)
    target = cls
    if source_type not in cls.__mro__[1:]:
        key = (source_type, cls)
        if key not in _SUBCLASSES:
            bases = (cls, source_type) if own_forward else (source_type, cls)
            _SUBCLASSES[key] = type(f"Quant{source_type.__name__}", bases, {})
        target = _SUBCLASSES[key]
    quantized = target.__new__(target)
    quantized.__dict__ = dict(source.__dict__)
    quantized._parameters = dict(source._parameters)
    quantized._buffers = dict(source._buffers)
    quantized._modules = dict(source._modules)
    return quantized


class QuantLinear(_QuantizedWeight, nn.Linear):
    weight_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quantizer: Quantizer | None,
        output_quantizer: Quantizer | None,
        activation: nn.Module | None = None,
        decomposition: OutlierDecomposition | None = None,
    ) -> QuantLinear:
        module = _adopt(cls, linear)
        module.weight_quantizer = weight_quantizer
        module.output_quantizer = output_quantizer
        module.activation = activation  # fused: applied before the output quantizer
        module.decomposition = decomposition
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decomposition is None:
            y = F.linear(x, self.quantized_weight(), self.bias)
        else:
            y = self.decomposition(x, self.weight, self.quantized_weight(), self.bias)
        if self.activation is not None:
            y = self.activation(y)
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantLayerNorm(_QuantizedWeight, nn.LayerNorm):
    weight_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    @classmethod
    def from_float(
        cls, norm: nn.LayerNorm, weight_quantizer: Quantizer | None, output_quantizer: Quantizer | None
    ) -> QuantLayerNorm:
        module = _adopt(cls, norm)
        module.weight_quantizer = weight_quantizer if norm.weight is not None else None
        module.output_quantizer = output_quantizer
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight() if self.weight is not None else None
        y = F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantRMSNorm(_QuantizedWeight, nn.Module):
    """An RMSNorm as T5 and Llama compute it (normalised in fp32, cast back to the input dtype, then times the
    weight), made from any module with a `weight` and a `variance_epsilon` (e.g. HF's LlamaRMSNorm), which it
    stays an instance of."""

    weight_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    @classmethod
    def from_float(
        cls, norm: nn.Module, weight_quantizer: Quantizer | None, output_quantizer: Quantizer | None
    ) -> QuantRMSNorm:
        module = _adopt(cls, norm, own_forward=True)
        module.weight_quantizer = weight_quantizer
        module.output_quantizer = output_quantizer
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + self.variance_epsilon)
        y = self.quantized_weight() * hidden.to(dtype)
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantEmbedding(_QuantizedWeight, nn.Embedding):
    """Quantized table; the activation quantizer sits on the embedding sum, outside this module."""

    weight_quantizer: Quantizer | None

    @classmethod
    def from_float(cls, embedding: nn.Embedding, weight_quantizer: Quantizer | None) -> QuantEmbedding:
        module = _adopt(cls, embedding)
        module.weight_quantizer = weight_quantizer
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            input_ids,
            self.quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
