"""Calibration (observe, then freeze) and switching a quantized model's weight / activation quantization.

Weight ranges need no data: `calibration()` computes them from the weights at once. Activation quantizers
observe while the scope is open and freeze when it closes. What they observe is a choice (CALIBRATION_INPUTS):
`float` passes values through unquantized, so every quantizer sees the float model's activations; `quantized`
(the paper's code) quantizes each value with the range estimated so far, so a quantizer sees what the
quantized model upstream of it produces. Frozen ranges are buffers, saved with the model state.
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
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(quantizer, Quantizer):
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


def set_quantization(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Quantize (or pass through) the weights and the activations of a calibrated model."""
    for quantizers, enabled in ((weight_quantizers(model), weights), (activation_quantizers(model), activations)):
        for quantizer in quantizers:
            quantizer.set_mode("quantize" if enabled else "off")
