"""Calibration (observe, then freeze) and switching a quantized model's weight / activation quantization.

Weight ranges need no data: `calibration()` computes them from the weights at once. Activation quantizers
observe while the scope is open and freeze when it closes. What they observe is a choice (CALIBRATION_INPUTS):
`float` passes values through unquantized, so every quantizer sees the float model's activations; `quantized`
(the paper's code) quantizes each value with the range estimated so far, so a quantizer sees what the
quantized model upstream of it produces. Frozen ranges are buffers, saved with the model state.

Two kinds of activation quantizer change that: dynamic (per-token) ones need no data, and per-embedding-group
ones with range-based permutation need their channel order first, from a pass of the float model
(`channel_order_pass`). `calibration_passes` lists the passes a model needs, each a scope to run the
calibration batches in; none when no activation range needs data.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .quantizer import Quantizer


def weight_quantizers(model: nn.Module) -> list[Quantizer]:
    return [
        module.weight_quantizer
        for module in model.modules()
        if isinstance(getattr(module, "weight_quantizer", None), Quantizer)
    ]


def activation_quantizers(model: nn.Module) -> list[Quantizer]:
    weights = {id(q) for q in weight_quantizers(model)}
    return [m for m in model.modules() if isinstance(m, Quantizer) and id(m) not in weights]


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    """Freeze every weight range from its weight, except ranges fixed before (GPTQ rounds onto a frozen grid)."""
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(quantizer, Quantizer) and not quantizer.fixed_range:
            quantizer.set_mode("observe")
            quantizer(module.weight)
            quantizer.freeze()


# What activation quantizers see while they calibrate -> whether each quantizes what it observed.
CALIBRATION_INPUTS = {"float": False, "quantized": True}


@contextmanager
def calibration(model: nn.Module, inputs: str = "float"):
    """Freeze weight ranges now; activation quantizers observe `inputs` (CALIBRATION_INPUTS) inside the scope
    and freeze on exit. On an error inside the scope the activation quantizers are switched off, never left
    half-calibrated."""
    if inputs not in CALIBRATION_INPUTS:
        raise ValueError(f"Unknown calibration inputs {inputs!r}; valid: {', '.join(CALIBRATION_INPUTS)}.")
    calibrate_weights(model)
    activations = activation_quantizers(model)
    for quantizer in activations:
        quantizer.set_mode("observe")
        quantizer.quantize_while_observing = CALIBRATION_INPUTS[inputs]
    try:
        yield model
    except BaseException:
        for quantizer in activations:
            quantizer.set_mode("off")
        raise
    finally:
        for quantizer in activations:
            quantizer.quantize_while_observing = False
    for quantizer in activations:
        quantizer.freeze()


def needs_data(model: nn.Module) -> bool:
    """Whether any activation quantizer takes its range from calibration data."""
    return any(q.needs_calibration for q in activation_quantizers(model))


def _needing_order(model: nn.Module) -> list[Quantizer]:
    return [q for q in activation_quantizers(model) if getattr(q, "needs_channel_order", False)]


@contextmanager
def channel_order_pass(model: nn.Module):
    """Calibration pass 1 of range-based permutation: every quantizer passes values through (the float model)
    while the grouped quantizers observe per-channel ranges; on exit each sorts its channels."""
    ordering = _needing_order(model)
    for quantizer in weight_quantizers(model) + activation_quantizers(model):
        quantizer.set_mode("off")
    for quantizer in ordering:
        quantizer.set_mode("order")
    try:
        yield model
    finally:
        for quantizer in ordering:
            quantizer.set_mode("off")
    for quantizer in ordering:
        quantizer.freeze_channel_order()


def calibration_passes(model: nn.Module, inputs: str = "float") -> list:
    """The scopes to run the calibration batches in, in order (weights are calibrated by the last, or at once
    when there is no pass)."""
    if not needs_data(model):
        calibrate_weights(model)
        for quantizer in activation_quantizers(model):
            quantizer.freeze()
        return []
    passes = [calibration(model, inputs)]
    if _needing_order(model):
        passes.insert(0, channel_order_pass(model))
    return passes


def set_quantization(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Quantize (or pass through) the weights and the activations of a calibrated model."""
    for quantizers, enabled in ((weight_quantizers(model), weights), (activation_quantizers(model), activations)):
        for quantizer in quantizers:
            quantizer.set_mode("quantize" if enabled else "off")
