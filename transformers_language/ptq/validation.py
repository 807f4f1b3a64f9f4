"""The post-training steps of `validate_*.py --quantize`, in order, on the plan's calibration batches: QuaRot's
rotations (rotation.py), the equivalent transforms of the float model (equivalent_transforms.py), the
quantizers (quantized_model.py), GPTQ's weight rounding (gptq_step.py), calibration (every pass the quantizers
need), and token-wise clipping's quantile search with its optional fine stage (quantization/token_clipping.py).
Returns what each step chose, for all_results.json.

Calibration batches are `--est_num_batches` batches of the calibration split's blocks, sampled by `--seed` (the
objective's targets, e.g. MLM masks, drawn from the same generator), identical in every process and in every
step above, so each step sees the same data. Token-wise clipping scores the quantized model's final hidden state
(what the head reads) against the float model's on those batches, by mean squared error. Every pass runs with
its batch's attention mask (quantization/token_mask.py): padding never enters a range, a statistic or the loss.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.nn import functional as F

from quantization.calibration import activation_quantizers, calibration_passes, set_quantization
from quantization.config import QuantConfig
from quantization.token_clipping import learn_ranges, search_quantile, token_clipping_quantizers
from quantization.token_mask import real_tokens, real_values

from ..objectives import Targets, derive_seed
from ..objectives.inputs import ModelInputs, attention_mask, batch_size, to_device
from ..runtime import progress_bar
from .equivalent_transforms import apply_transforms
from .gptq_step import apply_gptq
from .quantized_model import high_precision_layernorms, quantize_model
from .rotation import rotate_model

logger = logging.getLogger(__name__)
CALIBRATION_STREAM = 0xCA11B  # seeds the calibration sample apart from the evaluation masks

Batch = tuple[ModelInputs, torch.Tensor]


def calibration_batches(examples, targets: Targets, calibration: dict, seed: int, collate=None) -> list[Batch]:
    """The plan's calibration batches of `examples` (blocks, images or sentence pairs): (inputs, labels) pairs,
    on the CPU. `collate` (a padded batch's) makes a batch of a list of examples; without it the sample's columns
    are sliced."""
    size = calibration["calibration_batch_size"]
    count = min(len(examples), calibration["calibration_sequences"])
    generator = torch.Generator().manual_seed(derive_seed(seed, CALIBRATION_STREAM))
    indices = torch.randperm(len(examples), generator=generator)[:count].tolist()
    if collate is not None:
        return [
            targets(collate([examples[i] for i in indices[start : start + size]]), generator)
            for start in range(0, count, size)
        ]
    sample = examples[indices]
    return [
        targets({key: column[start : start + size] for key, column in sample.items()}, generator)
        for start in range(0, count, size)
    ]


def _calibrate(accelerator, model, loss_module, quant: QuantConfig, batches: list[Batch]) -> int:
    """Run `batches` in each calibration pass the model needs (none for dynamic ranges, two for PEG's range-based
    permutation), which freezes every range. The head and the loss run only when the preset quantizes the head
    (an FP head has nothing to observe). Returns the number of passes."""
    passes = calibration_passes(model, quant.calibration_inputs)
    device = accelerator.device

    def forward(inputs, labels):
        if quant.preset.quantize_head:
            loss_module(inputs, labels.to(device))
        else:
            model.body_output(inputs)

    for index, scope in enumerate(passes):
        with scope:
            description = "Calibrating" if index == len(passes) - 1 else "Ordering channels"
            _run_batches(accelerator, batches, description, forward)
    return len(passes)


def _run_batches(accelerator, batches: list[Batch], description: str, forward) -> None:
    """`forward(inputs, labels)` over `batches` without gradients, each batch on the device with its attention
    mask in scope (the hooks and quantizers inside observe real tokens only)."""
    with torch.no_grad():
        for inputs, labels in progress_bar(accelerator, batches, desc=description):
            inputs = to_device(inputs, accelerator.device)
            with accelerator.autocast(), real_tokens(attention_mask(inputs)):
                forward(inputs, labels)


def _clip_tokens(accelerator, model, quant: QuantConfig, batches: list[Batch]) -> dict:
    """Token-wise clipping: the quantile search over `quant.token_clipping_quantiles`, then the fine stage."""
    quantizers = token_clipping_quantizers(activation_quantizers(model))
    inputs = [to_device(batch_inputs, accelerator.device) for batch_inputs, _ in batches]

    def batch_loss(index: int, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The quantized body's output error on batch `index` over its real tokens (or, without `reference`,
        the output itself)."""
        with real_tokens(attention_mask(inputs[index])):
            output = model.body_output(inputs[index])
            if reference is None:
                return output
            return F.mse_loss(real_values(output).float(), real_values(reference).float())

    with torch.no_grad():
        set_quantization(model, weights=False, activations=False)
        references = [batch_loss(index) for index in range(len(inputs))]
        set_quantization(model, weights=quant.weight_quant, activations=quant.act_quant)

    def mean_loss() -> float:
        with torch.no_grad(), accelerator.autocast():
            losses = [batch_loss(index, reference) for index, reference in enumerate(references)]
        return float(torch.stack(losses).mean())

    quantile, losses = search_quantile(quantizers, quant.token_clipping_quantiles, mean_loss)
    record = {"quantizers": len(quantizers), "quantile": quantile, "loss_by_quantile": losses}
    if quant.token_clipping_fine_steps:
        parameters = [p for p in model.parameters() if p.requires_grad]
        for parameter in parameters:  # only the ranges learn
            parameter.requires_grad_(False)

        def step_loss(step: int) -> torch.Tensor:
            index = step % len(inputs)
            with accelerator.autocast():
                return batch_loss(index, references[index])

        try:
            history = learn_ranges(
                quantizers, step_loss, quant.token_clipping_fine_steps, quant.token_clipping_learning_rate
            )
        finally:
            for parameter in parameters:
                parameter.requires_grad_(True)
        record |= {"fine_steps": len(history), "fine_loss": mean_loss(), "fine_first_step_loss": history[0]}
    return record


def quantize_for_validation(
    accelerator, model, loss_module, quant: QuantConfig, batches: list[Batch], statistics_cache: dict | None = None
) -> dict:
    """Transform, quantize, calibrate and clip `model` in place (float and unquantized on entry); returns the
    record of what each step chose. `statistics_cache` shares the float statistics between runs on one model."""
    start = time.perf_counter()
    record = {}
    device = accelerator.device
    int16 = high_precision_layernorms(model, quant.preset)
    if quant.quarot:
        with torch.no_grad():
            record["rotation"] = rotate_model(model, quant.rotation_seed)
    if quant.transforms:
        with torch.no_grad():
            record["equivalent_transforms"] = apply_transforms(
                model, quant, lambda: (to_device(inputs, device) for inputs, _ in batches), int16, statistics_cache
            )
    quantize_model(model, quant)
    if quant.gptq:

        def body(inputs, _labels):
            model.body_output(inputs)

        record["gptq"] = apply_gptq(model, lambda: _run_batches(accelerator, batches, "GPTQ Hessians", body), quant)
    passes = _calibrate(accelerator, model, loss_module, quant, batches)
    if quant.token_clipping_points:
        record["token_clipping"] = _clip_tokens(accelerator, model, quant, batches)
    static = [q for q in activation_quantizers(model) if q.needs_calibration]
    record["calibration_seconds"] = time.perf_counter() - start
    # Dynamic ranges on untransformed, round-to-nearest weights read nothing of the sample: every
    # --calibration_seed gives this model (compare_quantization.py runs such a recipe once).
    record["reads_calibration_sample"] = bool(passes or quant.transforms or quant.gptq or quant.token_clipping_points)
    logger.info(
        "Calibrated %d activation quantizers on %d calibration blocks in %.1f s (%d passes%s)",
        len(static),
        sum(batch_size(inputs) for inputs, _ in batches) if passes else 0,
        record["calibration_seconds"],
        passes,
        "; " + ", ".join(quant.transforms) if quant.transforms else "",
    )
    return record
