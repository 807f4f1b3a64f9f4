"""The resolved plan of a run: everything a training or validation job executes, decided once from the flags
before any weights or data are loaded, and the very object `--dry_run` prints.

`resolve_training` and `resolve_validation` take the parsed `Flags` (arguments.py: each group typed and range
checked once), check every rule that joins them to files and checkpoints (data sources once, checkpoint,
method, sequence length, tokenizer or classes, quantization) and return a frozen `Plan`: the model config with
the attention method in it, the method itself, the sequence length (image side for a ViT), the tokenizer or image
processor, the splits (and a text model's block layout), and the W8A8 settings. What differs between text and images is
the family's modality's (modalities.py). The jobs build the model and the data from the plan and record
`plan.to_dict()` in their results, so a dry run and a real run can be compared field for field.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from transformers import BaseImageProcessor, PretrainedConfig, PreTrainedTokenizerBase

from quantization.config import QuantConfig
from quantization.float_quantizers import INTEGER

from ..arguments import Flags, is_flag
from ..data.images import ImageDataArgs
from ..data.modalities import get_modality
from ..data.text import DataArgs
from ..errors import UsageError
from ..families import Family
from ..models.attention_config import AttentionConfig
from ..models.loading import ModelArgs, build_config, describe_model, load_checkpoint_config
from ..models.method import check_method_flags, resolve_method
from ..models.model_classes import family_of_config
from ..ptq.equivalent_transforms import check_transformable
from ..ptq.quant_args import calibration_batch_size, quant_config_from_args
from ..ptq.quantized_model import planned_points
from ..ptq.rotation import check_rotatable

NOT_PLANNED = ("dry_run", "list_quant_points")  # flags that say how a plan is used, not what it is


@dataclass(frozen=True)
class Plan:
    job: str
    """'train' or 'validate'."""
    family: Family
    flags: Flags = field(compare=False, repr=False)
    """The command line, each flag group parsed once (the jobs read their training, tracking and evaluation
    settings here)."""
    settings: dict
    """Every flag as parsed (but NOT_PLANNED), the data flags as resolved."""
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
            **describe_model(self.config, self.family.name),
        }
        if self.job == "train":
            values["sequences_per_step"] = self.sequences_per_step
        else:
            values["quantization"] = quantization_record(self.quantization, self.calibration, self.quant_points)
        return values


def quantization_record(config: QuantConfig | None, calibration: dict | None, points=()) -> dict | None:
    """Every choice of the W8A8 protocol, as all_results.json records it, with the count of points per kind,
    bit width, number format if not the integer grid, and granularity (e.g. 'activation 16 bits per_tensor': 6,
    'weight 8 bits fp8_e4m3 per_channel': 12)."""
    if config is None:
        return None
    counts = Counter(
        " ".join((p["kind"], f"{p['bits']} bits", *([p["format"]] if p["format"] != INTEGER else []), p["granularity"]))
        for p in points
    )
    record = asdict(config) | {"preset": asdict(config.preset), "points": dict(sorted(counts.items()))} | calibration
    return json.loads(json.dumps(record))  # tuples as the lists they are read back as


def _settings(flags: Flags, data) -> dict:
    """Every flag as parsed (but NOT_PLANNED), the data flags as resolved (e.g. a checkpoint's block layout)."""
    resolved = {item.name: getattr(data, item.name) for item in fields(data) if is_flag(item)}
    values = {key: value for key, value in flags.values.items() if key not in NOT_PLANNED}
    return values | {key: value for key, value in resolved.items() if key in values}


def _plan(job: str, family: Family, flags: Flags, data, **resolved) -> Plan:
    """A Plan of the flags and what was resolved from them (`data`: the data flags as resolved)."""
    return Plan(
        job=job, family=family, flags=flags, settings=_settings(flags, data), model=flags.model, data=data, **resolved
    )


def resolve_training(flags: Flags, family: Family, num_processes: int) -> Plan:
    """The plan of a pre-training run: the data checked, the tokenizer or image processor loaded, the model
    config built and the attention method resolved into it."""
    modality = get_modality(family)
    data, classes = modality.check_sources(flags.data, ("train", "validation"))
    preprocessor = modality.load_preprocessor(flags.model)
    config, checkpoint = build_config(flags.model)
    modality.configure(config, preprocessor, data, classes, checkpoint)
    seq_length = modality.sequence_length(data, flags.model, config, family.sequence.name)
    attention = resolve_method(flags.attention, flags.model, config, modality.tokens(seq_length, config))
    data, layout_source = modality.resolve_layout(data, None)
    training = flags.training
    return _plan(
        "train",
        family,
        flags,
        data,
        config=config,
        attention=attention,
        seq_length=seq_length,
        splits=("train", "validation"),
        block_layout_source=layout_source,
        preprocessor=preprocessor,
        sequences_per_step=training.per_device_train_batch_size * training.gradient_accumulation_steps * num_processes,
    )


def _check_calibration_flags(data, quantization) -> None:
    """Training data only calibrates --quantize on the training split."""
    if not quantization.quantize or quantization.calibration_split != "train":
        only_train = ("train_file", "train_dir", "train_percentage", "max_train_samples")
        unused = [f"--{name}" for name in only_train if getattr(data, name, None)]
        if unused:
            raise UsageError(f"{', '.join(unused)} only choose calibration data for --quantize; drop them.")


def resolve_validation(flags: Flags, family: Family, script: str) -> Plan:
    """The plan of an evaluation: the checkpoint's config and method (flags may repeat it, never contradict it),
    its block layout unless --block_layout is given, the data checked once, and the W8A8 settings."""
    modality = get_modality(family)
    flags_q, checkpoint = flags.quantization, flags.model.model_name_or_path
    listing = flags_q.list_quant_points  # reads the checkpoint's config alone
    _check_calibration_flags(flags.data, flags_q)
    quantization = quant_config_from_args(flags_q, family)
    calibrate_on_train = flags_q.quantize and flags_q.calibration_split == "train"
    splits = ("train", "validation") if calibrate_on_train else ("validation",)
    data, classes = (flags.data, None) if listing else modality.check_sources(flags.data, splits)
    config = load_checkpoint_config(flags.model, script)
    saved = family_of_config(config)
    if saved is not family:
        raise UsageError(
            f"{checkpoint} holds a model of {saved.train_script}, but {script} evaluates models of "
            f"{family.train_script}; use {saved.validate_script} for it."
        )
    data, layout_source = modality.resolve_layout(data, checkpoint)
    seq_length = modality.sequence_length(data, flags.model, config, family.sequence.name)
    attention = AttentionConfig.from_model_config(config)
    check_method_flags(flags.attention, attention, modality.tokens(seq_length, config), f"the checkpoint {checkpoint}")
    preprocessor = modality.load_preprocessor(flags.model)
    if not listing:
        modality.configure(config, preprocessor, data, classes, f"the checkpoint {checkpoint}")
    calibration, points = None, ()
    if quantization is not None:
        if quantization.transforms:
            check_transformable(family, config, quantization.transforms)
        if quantization.quarot:
            check_rotatable(family, config)
        points = tuple(planned_points(config, quantization, family.name))
        batch = calibration_batch_size(flags_q, flags.evaluation.per_device_eval_batch_size)
        calibration = {
            "calibration_split": flags_q.calibration_split,
            "calibration_seed": flags.evaluation.seed if flags_q.calibration_seed is None else flags_q.calibration_seed,
            "calibration_batch_size": batch,
            "calibration_sequences": flags_q.est_num_batches * batch,
            "context_point": "after_gate",  # (the paper's BERT; its OPT code quantized per head before the gate)
        }
    return _plan(
        "validate",
        family,
        flags,
        data,
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
