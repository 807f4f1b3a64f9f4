"""The evaluation job behind `validate_mlm.py` and `validate_clm.py`: perplexity and outlier statistics of a
checkpoint on the validation split.

The checkpoint's config.json gives the attention method (method flags may repeat it, never contradict it).
One pass over the validation blocks computes the token-weighted perplexity (and the paper's figure), the
inf-norm / kurtosis / >6 sigma statistics of the tensors of metrics.md with the channel and token analysis,
and the attention diagnostics; MLM uses the fixed evaluation masks of `--seed`, the same in every run.
Results go to `all_results.json` in `--output_dir` (atomically) with the settings that produced them.
"""

from __future__ import annotations

import logging

import torch
import transformers
from accelerate.utils import set_seed

from quantization.decomposition import OutlierDecomposition

from ..arguments import FlagParser, add_group
from ..data.modalities import get_modality, probe_inputs
from ..evaluation.attention_stats import AttentionStatistics
from ..evaluation.intervention import zero_out
from ..evaluation.literature_metrics import LiteratureStatistics, literature_results
from ..evaluation.loop import evaluate
from ..evaluation.metrics import OUTLIER_SIGMAS, ActivationStatistics
from ..evaluation.outlier_report import log_results, outlier_results
from ..families import Family, job_family
from ..files import check_output_dir, write_json_atomic
from ..models.loading import load_checkpoint
from ..objectives import Objective, get_objective
from ..ptq.quant_args import add_quantization_args
from ..ptq.quantized_model import llm_int8_shares
from ..ptq.validation import calibration_batches, quantize_for_validation
from ..runtime import (
    CompiledModule,
    check_launch,
    end_processes,
    print_dry_run,
    setup_logging,
    start_accelerator,
    sum_across_processes,
)
from .job_args import EvaluationArgs, job_parser
from .plan import resolve_validation

logger = logging.getLogger(__name__)


def build_parser(objective: Objective, family: Family | None = None) -> FlagParser:
    family = family or job_family(objective.name)
    parser = job_parser(
        family,
        objective,
        training=False,
        description=f"Evaluate a {family.model_type.upper()} checkpoint: {objective.reported[0][1]} and outliers.",
    )
    add_group(parser, "evaluation", EvaluationArgs, "evaluation")
    add_quantization_args(parser, family.weight_ranges)
    return parser


def print_points(accelerator, points) -> dict:
    """`--list_quant_points`: one line per quantization point (name, kind, bits, number format, granularity)."""
    if accelerator.is_main_process:
        width = max(len(p["name"]) for p in points)
        for point in points:
            line = f"{point['name']:<{width}}  {point['kind']:<10}  {point['bits']:>2} bits  {point['format']:<8}"
            print(f"{line}  {point['granularity']}")
    return {"points": list(points)}


def validate(
    objective_name: str,
    argv: list[str] | None = None,
    statistics_cache: dict | None = None,
    family_name: str | None = None,
) -> dict:
    """Evaluate the checkpoint of `argv` for `objective_name` ('mlm', 'clm', 'glue', 'image_classification') and
    `family_name` (default: the objective's first family); returns the figures written to `all_results.json`.
    `statistics_cache` (a dict kept by the caller) shares the float calibration statistics
    of the equivalent transforms between runs on the same checkpoint and calibration flags."""
    objective = get_objective(objective_name)
    family = job_family(objective_name, family_name)
    script = family.validate_script
    flags = build_parser(objective, family).parse(argv)
    evaluation = flags.evaluation
    output_dir = check_output_dir(evaluation.output_dir)
    # The W8A8 simulation runs in fp32 (its ranges and grids are fp32 arithmetic; bf16 would round the values it
    # quantizes first): --mixed_precision applies to the float model's evaluation only.
    quantize = flags.quantization.quantize
    accelerator = start_accelerator("no" if quantize else evaluation.mixed_precision)
    setup_logging(accelerator)
    if quantize and evaluation.mixed_precision not in (None, "no"):
        logger.info("--quantize: the W8A8 simulation runs in fp32; --mixed_precision applies to FP evaluations only")
    check_launch(accelerator)
    set_seed(evaluation.seed)

    plan = resolve_validation(flags, family, script)
    if evaluation.dry_run:
        return print_dry_run(accelerator, plan.to_dict())
    if flags.quantization.list_quant_points:
        return print_points(accelerator, plan.quant_points)
    objective = objective.bound(plan.config)
    config, preprocessor, quant_config = plan.config, plan.preprocessor, plan.quantization
    model = load_checkpoint(plan.model, config, accelerator.device, plan.family.name)
    loss_module = objective.loss_class(model).to(accelerator.device).eval()

    splits = get_modality(plan.family).prepare_splits(plan, accelerator, training=False)
    targets = objective.targets(preprocessor, config, flags.get("objective"))
    dataset = objective.evaluation_set(splits["validation"], targets, evaluation.seed)
    post_training = {}
    if quant_config is not None:
        if plan.calibration["calibration_split"] == "validation":
            logger.warning(
                "Calibrating on the validation split (as the paper's BERT runs did): ranges see the test data."
            )
        source = splits.get("train", splits["validation"])
        seed = plan.calibration["calibration_seed"]
        batches = calibration_batches(source, targets, plan.calibration, seed, objective.collate)
        post_training = quantize_for_validation(
            accelerator, model, loss_module, quant_config, batches, statistics_cache
        )
    for module in model.modules():  # LLM.int8() reports the evaluation's share of FP channels, not calibration's
        if isinstance(module, OutlierDecomposition):
            module.reset_statistics()
    inputs = probe_inputs(plan.family, preprocessor, config)
    sites, hidden = model.outlier_sites(), config.hidden_size
    activations = ActivationStatistics(
        model, sites, hidden, inputs.token_space, evaluation.kurtosis_max_batches, token_ids=inputs.token_ids
    )
    attention_stats = AttentionStatistics(model, inputs)
    zero_out_k = evaluation.zero_out_top_k
    # The statistics pass runs eagerly: its hooks keep Python state that changes every batch, so a compiled model
    # would recompile batch after batch. The zero-out intervention's passes have no such hooks.
    compile_zero_out = evaluation.torch_compile and quant_config is None and zero_out_k > 0
    if evaluation.torch_compile:
        compiles = "the zero-out passes" if compile_zero_out else "nothing here"
        logger.info("--torch_compile: the statistics pass and W8A8 run eagerly; compiled: %s", compiles)
    positions = get_modality(plan.family).tokens(plan.seq_length, config) if zero_out_k else None
    literature = LiteratureStatistics(model, positions)
    results = evaluate(
        accelerator,
        loss_module,
        dataset,
        objective,
        evaluation.per_device_eval_batch_size,
        probes=(activations, attention_stats, literature),
    )
    figures, attention = activations.synced(accelerator), attention_stats.synced(accelerator)
    results |= outlier_results(figures, attention, model.headlines, inputs.token_name, evaluation.outlier_top_k)
    literature_figures = literature.synced(accelerator)
    results |= literature_results(literature_figures, attention)
    if zero_out_k:
        forward = CompiledModule(loss_module) if compile_zero_out else loss_module
        batch_size = evaluation.per_device_eval_batch_size
        results["zero_out"] = zero_out(
            accelerator, forward, model, dataset, objective, batch_size, literature_figures, zero_out_k
        )
    shares = llm_int8_shares(model, lambda counts: sum_across_processes(accelerator, [counts])[0])
    if shares:
        results["llm_int8_float_channel_share"] = shares
        results["llm_int8_mean_float_channel_share"] = sum(shares.values()) / len(shares)
    results |= post_training
    planned = plan.to_dict()
    settings = plan.settings | {
        "script": script,
        "seq_length": planned["seq_length"],
        "block_layout_source": planned["block_layout_source"],
        "attention": planned["attention"],
        "validation_blocks": len(dataset),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "kurtosis": "Pearson (non-excess), population std, no epsilon",
        "outlier_definition": f"|x - mean| > {OUTLIER_SIGMAS:g} std, per sequence and tensor (population std)",
        **inputs.record(),
        "quantization": planned["quantization"],
        "plan": planned,  # what --dry_run prints for these flags
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    log_results(results, model.headlines, objective.reported)
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "all_results.json", results | {"settings": settings})
        if evaluation.plot:
            from ..evaluation.plots import write_plots  # matplotlib only when plotting

            for path in write_plots(figures, model.stream_kind, output_dir):
                logger.info("Wrote %s", path)
    end_processes(accelerator)
    return results
