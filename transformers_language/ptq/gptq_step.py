"""GPTQ in the validation flow (`--gptq`): after the quantizers are in, round each quantized Linear's weight by
GPTQ (quantization/gptq.py) onto the grid its weight quantizer froze, instead of to nearest.

One pass of the float model over the calibration batches gathers every Linear's input Hessian at once (the
non-sequential variant: each layer's inputs are the float model's, not the partly quantized model's), on real
tokens only. The rounded weight replaces the float one, so the frozen weight quantizer maps it onto itself, and
its range is marked fixed: the calibration that follows keeps it. The head's Linears are left to round-to-nearest,
as GPTQ's own runs leave the LM head. The record keeps, per Linear, GPTQ's layer-wise output error
tr((W - Q) H (W - Q)^T) relative to round-to-nearest's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from quantization.calibration import calibrate_weights, set_quantization
from quantization.config import QuantConfig
from quantization.gptq import HessianAccumulator, gptq, round_to_grid
from quantization.modules import QuantLinear
from quantization.quantizer import Quantizer
from quantization.weight_groups import WeightGroupQuantizer


def weight_grid(quantizer: Quantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The frozen integer grid of `quantizer` per entry of `weight` (out, in): scale and zero point broadcast
    against it, and the grid's ends."""
    scale, zero_point = quantizer.scale, quantizer.zero_point
    if isinstance(quantizer, WeightGroupQuantizer):
        groups = weight.shape[1] // quantizer.group_size
        scale = scale.reshape(weight.shape[0], groups).repeat_interleave(quantizer.group_size, dim=1)
        zero_point = zero_point.reshape(weight.shape[0], groups).repeat_interleave(quantizer.group_size, dim=1)
    elif quantizer.axis is not None:
        scale, zero_point = scale[:, None], zero_point[:, None]
    return scale, zero_point, *quantizer.q_range


def gptq_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The quantized Linears outside the head whose weights sit on an integer grid."""
    wiring = model.family.wiring
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear)
        and type(module.weight_quantizer) in (Quantizer, WeightGroupQuantizer)
        and not wiring.in_head(name)
    }


def _layer_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    return float(((delta.float() @ hessian) * delta.float()).sum())


@torch.no_grad()
def apply_gptq(model: nn.Module, run_batches: Callable[[], None], quant: QuantConfig) -> dict:
    """Round every `gptq_linears` weight of the quantized `model` by GPTQ; `run_batches` runs the calibration
    batches through the model's body. Leaves the weights quantized and the activations off for calibration."""
    start = time.perf_counter()
    linears = gptq_linears(model)
    calibrate_weights(model)
    set_quantization(model, weights=False, activations=False)
    accumulators = {name: HessianAccumulator(module.in_features) for name, module in linears.items()}
    hooks = [
        module.register_forward_pre_hook(lambda _, args, acc=accumulators[name]: acc.add(args[0]))
        for name, module in linears.items()
    ]
    try:
        run_batches()
    finally:
        for hook in hooks:
            hook.remove()
    ratios = {}
    for name, module in linears.items():
        hessian = accumulators.pop(name).hessian()
        grid = weight_grid(module.weight_quantizer, module.weight)
        rounded = gptq(module.weight, hessian, *grid, quant.gptq_block_size, quant.gptq_damping, quant.gptq_act_order)
        nearest = round_to_grid(module.weight.float(), *grid)
        rtn_error = _layer_error(module.weight - nearest, hessian)
        ratios[name] = _layer_error(module.weight - rounded, hessian) / rtn_error if rtn_error > 0 else 1.0
        module.weight.copy_(rounded.to(module.weight.dtype))
        module.weight_quantizer.fixed_range = True
    set_quantization(model, weights=True, activations=False)
    ordered = sorted(ratios.values())
    return {
        "linears": len(linears),
        "seconds": time.perf_counter() - start,
        "median_error_vs_rtn": ordered[len(ordered) // 2] if ordered else None,
        "error_vs_rtn": ratios,
    }
