"""What a family reads, and everything that follows from it: text (token ids, BERT / OPT), images (pixels,
ViT) or sentence pairs (GLUE examples, sentence_pairs.py). `Family.modality` picks one; the jobs (pretrain.py,
validate.py, plan.py) ask it instead of branching.

A modality supplies the data flags and their checks, the preprocessor (tokenizer or image processor, saved with
every checkpoint), the from-scratch config values that come from the preprocessor and the data (vocabulary and
special tokens; classes and image size), the sequence length (tokens per block; image side in pixels), the
datasets of each split, the training sampler's kind and the records saved beside a model, and the probes'
view of its inputs (probe_views.py).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from transformers import AutoImageProcessor, PretrainedConfig

from ..arguments import FlagParser
from ..errors import InputFileError, UsageError
from ..evaluation.probe_views import ImageInputs, TextInputs
from ..families import Family
from ..models.loading import ModelArgs, check_sequence_length, check_tokenizer_fits, load_tokenizer
from .block_layouts import layout_record, resolve_block_layout
from .images import (
    LABEL_COLUMNS,
    ImageDataArgs,
    SeededImages,
    add_image_data_args,
    check_image_sources,
    class_names,
    eval_transform,
    load_image_split,
    train_transform,
    with_eval_transform,
)
from .sentence_pairs import SentencePairModality
from .text import DataArgs, add_data_args, check_data_sources, prepare_splits

logger = logging.getLogger(__name__)


class TextModality:
    """Token ids from a tokenizer; blocks of text in a block layout."""

    omitted_model_flags = ("image_processor_name",)
    samples_with_seeds = False

    def add_data_args(self, parser: FlagParser, family: Family, training: bool) -> None:
        add_data_args(parser, family.sequence, **({} if training else {"layout_default": None}))

    def check_sources(self, data: DataArgs, splits: tuple[str, ...]) -> tuple[DataArgs, None]:
        """The files of `splits`, checked once before anything loads: the data settings, and no classes."""
        check_data_sources(data, splits)
        return data, None

    def resolve_layout(self, data: DataArgs, checkpoint: str | None) -> tuple[DataArgs, str]:
        """The data settings with the block layout resolved, and where it comes from (validation: the
        checkpoint's record unless --block_layout)."""
        if checkpoint is None:
            return data, "--block_layout"
        layout, source = resolve_block_layout(data.block_layout, checkpoint)
        return replace(data, block_layout=layout), source

    def load_preprocessor(self, model: ModelArgs):
        return load_tokenizer(model)

    def configure(self, config: PretrainedConfig, tokenizer, data, classes, source: str | None) -> None:
        """From scratch (`source` None): the vocabulary size and special tokens of the tokenizer. From a
        checkpoint: the tokenizer must fit its embedding table."""
        if source is not None:
            check_tokenizer_fits(tokenizer, config, source)
            return
        config.vocab_size = len(tokenizer)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None and name in config.to_dict():
                setattr(config, name, getattr(tokenizer, name))

    def sequence_length(self, data: DataArgs, model: ModelArgs, config: PretrainedConfig, flag: str) -> int:
        """Tokens per block (CLM default: the model's positions, at most 1024), checked against the table."""
        seq_length = data.seq_length
        if seq_length is None:
            seq_length = min(config.max_position_embeddings, 1024)
        check_sequence_length(config, seq_length, flag)
        return seq_length

    def tokens(self, seq_length: int, config: PretrainedConfig) -> int:
        """The attention's sequence length (T of the alpha form and of sigmoid attention)."""
        return seq_length

    def prepare_splits(self, plan, accelerator, training: bool) -> dict:
        return prepare_splits(plan.data, plan.splits, plan.preprocessor, plan.seq_length, accelerator)

    def records(self, data: DataArgs) -> dict[str, dict]:
        return layout_record(data.block_layout)

    def probe_inputs(self, preprocessor, config: PretrainedConfig) -> TextInputs:
        return TextInputs(preprocessor, config)


class ImageModality:
    """Pixels from an image processor (mean, std); images of a hub dataset or class folders."""

    omitted_model_flags = ("tokenizer_name",)
    samples_with_seeds = True

    def add_data_args(self, parser: FlagParser, family: Family, training: bool) -> None:
        add_image_data_args(parser, family.sequence, training)

    def check_sources(self, data: ImageDataArgs, splits: tuple[str, ...]) -> tuple[ImageDataArgs, list[str] | None]:
        """The folders of `splits` and their images, checked once before anything loads: the data settings with
        the broken files to leave out, and the class names (None: a hub dataset's, read in `configure`)."""
        return check_image_sources(data, splits)

    def resolve_layout(self, data: ImageDataArgs, checkpoint: str | None) -> tuple[ImageDataArgs, None]:
        return data, None

    def load_preprocessor(self, model_args: ModelArgs):
        """--image_processor_name, else the checkpoint's, else ViT's defaults (mean = std = 0.5)."""
        from transformers import ViTImageProcessor  # its fast form needs torchvision, which text runs may lack

        name = model_args.image_processor_name or model_args.model_name_or_path
        if name is None:
            return ViTImageProcessor()
        flag = "--image_processor_name" if model_args.image_processor_name else "--model_name_or_path"
        try:
            return AutoImageProcessor.from_pretrained(name, cache_dir=model_args.model_cache_dir)
        except (OSError, ValueError) as error:
            if model_args.image_processor_name is None:  # a checkpoint without one: ViT's defaults
                logger.info("No image processor in %s: using ViT's defaults (mean = std = 0.5)", name)
                return ViTImageProcessor()
            raise InputFileError(
                f"{flag} {name}: no image processor found there ({str(error).splitlines()[0]}); pass a folder with "
                "preprocessor_config.json or a hub name."
            ) from error

    def configure(
        self, config: PretrainedConfig, processor, data: ImageDataArgs, classes: list[str] | None, source: str | None
    ) -> None:
        """The classes of the training (or validation) data (`classes`: the folders' names, None for a hub
        dataset): a new model's classifier size and label names; a checkpoint's must be the same."""
        names = classes if classes is not None else hub_class_names(data)
        if source is None:
            config.num_labels = len(names)
            config.id2label = dict(enumerate(names))
            config.label2id = {name: index for index, name in enumerate(names)}
            return
        stored = [config.id2label[i] for i in range(config.num_labels)]
        if stored != names:
            raise UsageError(
                f"{source} classifies {config.num_labels} classes ({_preview(stored)}) but the data has {len(names)} "
                f"({_preview(names)}); use data with the checkpoint's classes, in the same order."
            )

    def sequence_length(self, data: ImageDataArgs, model: ModelArgs, config: PretrainedConfig, flag: str) -> int:
        """The image side in pixels: the flag (a new model's config takes it), else the config's; a multiple of
        the patch size, and a checkpoint's own size (its position table)."""
        size = data.seq_length
        if size is None:
            return config.image_size
        if size % config.patch_size:
            raise UsageError(f"--{flag} {size} is not a multiple of the patch size {config.patch_size}.")
        if model.model_name_or_path is None:
            config.image_size = size
        elif size != config.image_size:
            raise UsageError(
                f"--{flag} {size} differs from the checkpoint's image_size {config.image_size} (its position "
                f"table); drop --{flag} or pass {config.image_size}."
            )
        return size

    def tokens(self, seq_length: int, config: PretrainedConfig) -> int:
        """[CLS] and the patches."""
        return (seq_length // config.patch_size) ** 2 + 1

    def prepare_splits(self, plan, accelerator, training: bool) -> dict:
        """Training (with `training`): seeded augmentation of each image; every other split (and calibration
        on the training images) the deterministic evaluation transform."""
        processor, data = plan.preprocessor, plan.data
        mean, std = processor.image_mean, processor.image_std
        evaluation = eval_transform(plan.seq_length, mean, std, data.eval_crop_fraction)
        splits = {}
        with accelerator.main_process_first():  # the main process downloads and caches first
            for split in plan.splits:
                dataset = load_image_split(data, split)
                if training and split == "train":
                    augment = plan.flags.augmentation
                    splits[split] = SeededImages(dataset, train_transform(plan.seq_length, mean, std, augment))
                else:
                    splits[split] = with_eval_transform(dataset, evaluation)
        return splits

    def records(self, data: ImageDataArgs) -> dict[str, dict]:
        return {}

    def probe_inputs(self, preprocessor, config: PretrainedConfig) -> ImageInputs:
        return ImageInputs(preprocessor, config)


def _preview(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def hub_class_names(data: ImageDataArgs) -> list[str]:
    """The class names of a hub dataset, read from its label feature without loading images."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(data.dataset_name, data.dataset_config_name)
    features = builder.info.features
    label = data.label_column or next((c for c in LABEL_COLUMNS if c in (features or {})), None)
    if features is None or label is None or not hasattr(features[label], "names"):
        return class_names(load_image_split(data, "validation"))
    return list(features[label].names)


# Keyed by `Family.modality`.
MODALITIES = {"text": TextModality(), "image": ImageModality(), "sentence_pairs": SentencePairModality()}


def get_modality(family: Family) -> TextModality | ImageModality | SentencePairModality:
    return MODALITIES[family.modality]


def probe_inputs(family: Family, preprocessor, config: PretrainedConfig) -> TextInputs | ImageInputs:
    """The probes' view of `family`'s inputs (`preprocessor`: its tokenizer or image processor, or None)."""
    return get_modality(family).probe_inputs(preprocessor, config)
