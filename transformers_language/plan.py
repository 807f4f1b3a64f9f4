"""The resolved plan of a run: everything a training or validation job executes, decided once from the flags
before any weights or data are loaded, and the very object `--dry_run` prints.

`resolve_training` and `resolve_validation` check every rule (flags, files, checkpoint, method, sequence
length, tokenizer or classes, quantization) and return a frozen `Plan`: the model config with the attention
method in it, the method itself, the sequence length (image side for a ViT), the tokenizer or image processor,
the splits (and a text model's block layout), and the W8A8 settings. What differs between text and images is
the family's modality's (modalities.py). The jobs build the model and the data from the plan and record
`plan.to_dict()` in their results, so a dry run and a real run can be compared field for field.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from transformers import BaseImageProcessor, PretrainedConfig, PreTrainedTokenizerBase

from quantization.config import QuantConfig

from .arguments import parse_group
from .attention_config import AttentionConfig
from .data import DataArgs
from .equivalent_transforms import check_transformable
from .families import Family
from .image_data import ImageDataArgs
from .modalities import get_modality
from .model_loading import (
    ModelArgs,
    build_config,
    check_method_flags,
    describe_model,
    load_checkpoint_config,
    resolve_method,
)
from .quant_args import calibration_batch_size, quant_config_from_args
from .quantized_model import planned_points

NOT_PLANNED = ("dry_run", "list_quant_points")  # flags that say how a plan is used, not what it is


@dataclass(frozen=True)
class Plan:
    job: str
    """'train' or 'validate'."""
    family: Family
    settings: dict
    """Every flag as parsed (but NOT_PLANNED)."""
    model: ModelArgs
    """Where the config, weights and tokenizer come from."""
    config: PretrainedConfig = field(compare=False)
    """The model config, the attention method stored in it."""
    attention: AttentionConfig
    seq_length: int
    data: DataArgs | ImageDataArgs
    """Where the texts or images come from (text: how they become blocks, block_layout resolved)."""
    splits: tuple[str, ...]
    block_layout_source: str | None
    """Text: where the block layout comes from."""
    preprocessor: PreTrainedTokenizerBase | BaseImageProcessor = field(compare=False, repr=False)
    """The tokenizer or image processor."""
    quantization: QuantConfig | None = None
    sequences_per_step: int | None = None
    """Training: sequences per optimizer step over all processes."""
    calibration: dict | None = None
    """Validation with --quantize: where the calibration batches come from and how many sequences."""
    quant_points: tuple[dict, ...] = field(default=(), compare=False, repr=False)
    """Validation with --quantize: every quantization point with its bits and granularity."""

    def to_dict(self) -> dict:
        """The plan as JSON-ready values (what --dry_run prints and the results record)."""
        values = {
            "job": self.job,
            "model_type": self.family.model_type,
            "settings": self.settings,
            "model": asdict(self.model),
            "seq_length": self.seq_length,
            "attention": self.attention.to_dict(),
            "data": asdict(self.data),
            "splits": list(self.splits),
            "block_layout": getattr(self.data, "block_layout", None),
            "block_layout_source": self.block_layout_source,
            "preprocessor": getattr(self.preprocessor, "name_or_path", type(self.preprocessor).__name__),
            **describe_model(self.config),
        }
        if self.job == "train":
            values["sequences_per_step"] = self.sequences_per_step
        else:
            values["quantization"] = quantization_record(self.quantization, self.calibration, self.quant_points)
        return values


def quantization_record(config: QuantConfig | None, calibration: dict | None, points=()) -> dict | None:
    """Every choice of the W8A8 protocol, as all_results.json records it, with the count of points per kind,
    bit width and granularity (e.g. 'activation 16 bits per_tensor': 6)."""
    if config is None:
        return None
    counts = Counter(f"{p['kind']} {p['bits']} bits {p['granularity']}" for p in points)
    record = asdict(config) | {"preset": asdict(config.preset), "points": dict(sorted(counts.items()))} | calibration
    return json.loads(json.dumps(record))  # tuples as the lists they are read back as


def _plan(job: str, family: Family, args: argparse.Namespace, **resolved) -> Plan:
    """A Plan of the flags `args` (their typed groups read once, here) and what was resolved from them."""
    return Plan(
        job=job,
        family=family,
        settings={key: value for key, value in vars(args).items() if key not in NOT_PLANNED},
        model=parse_group(ModelArgs, args),
        data=parse_group(get_modality(family).data_args, args),
        **resolved,
    )


def resolve_training(args: argparse.Namespace, family: Family, num_processes: int) -> Plan:
    """The plan of a pre-training run (flags and files already checked by the job's parser checks)."""
    modality = get_modality(family)
    modality.check_sources(args, ("train", "validation"), training=True)
    preprocessor = modality.load_preprocessor(args)
    config, checkpoint = build_config(args)
    modality.configure(config, preprocessor, args, checkpoint)
    seq_length = modality.sequence_length(args, config, family.sequence.name)
    attention = resolve_method(args, config, modality.tokens(seq_length, config))
    return _plan(
        "train",
        family,
        args,
        config=config,
        attention=attention,
        seq_length=seq_length,
        splits=("train", "validation"),
        block_layout_source=modality.resolve_layout(args, None),
        preprocessor=preprocessor,
        sequences_per_step=args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes,
    )


def resolve_validation(args: argparse.Namespace, family: Family, script: str) -> Plan:
    """The plan of an evaluation: the checkpoint's config and method (flags may repeat it, never contradict it),
    its block layout unless --block_layout is given, and the W8A8 settings."""
    modality = get_modality(family)
    listing = args.list_quant_points  # reads the checkpoint's config alone
    if not listing:
        modality.check_sources(args, ("validation",), training=False)
    quantization = quant_config_from_args(args)
    config = load_checkpoint_config(args, script)
    layout_source = modality.resolve_layout(args, args.model_name_or_path)
    seq_length = modality.sequence_length(args, config, family.sequence.name)
    attention = AttentionConfig.from_model_config(config)
    tokens = modality.tokens(seq_length, config)
    check_method_flags(args, attention, tokens, f"the checkpoint {args.model_name_or_path}")
    preprocessor = modality.load_preprocessor(args)
    calibrate_on_train = args.quantize and args.calibration_split == "train"
    splits = ("train", "validation") if calibrate_on_train else ("validation",)
    if not listing:
        modality.check_sources(args, splits, training=False)
        modality.configure(config, preprocessor, args, f"the checkpoint {args.model_name_or_path}")
    calibration, points = None, ()
    if quantization is not None:
        if quantization.transforms:
            check_transformable(family, config)
        points = tuple(planned_points(config, quantization))
        batch = calibration_batch_size(args)
        calibration = {
            "calibration_split": args.calibration_split,
            "calibration_batch_size": batch,
            "calibration_sequences": args.est_num_batches * batch,
            "context_point": "after_gate",  # (the paper's BERT; its OPT code quantized per head before the gate)
        }
    return _plan(
        "validate",
        family,
        args,
        config=config,
        attention=attention,
        seq_length=seq_length,
        splits=splits,
        block_layout_source=layout_source,
        preprocessor=preprocessor,
        quantization=quantization,
        calibration=calibration,
        quant_points=points,
    )
