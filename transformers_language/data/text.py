"""Text datasets for pre-training and evaluation: hub setups or local files, tokenized into fixed-length blocks.

One pipeline serves MLM and CLM. Each split is loaded on its own (evaluation never touches the training
split), blank lines are dropped, and the texts become blocks of exactly `seq_length` tokens in the layout
of `--block_layout` (block_layouts.py: `stream`, the paper's, or `bos_first`). Either way a long text is
split, never truncated. Grouping runs in one process, so the blocks do not depend
on `--preprocessing_num_workers`. Processed splits are saved under `--data_cache_dir` with a
key made of everything that determines them, and a later run with the same settings loads them instead of
tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
from datasets import Dataset, concatenate_datasets, load_from_disk
from transformers import PreTrainedTokenizerBase

from ..arguments import PERCENTAGE, POSITIVE, FlagParser, add_group, arg, from_flag
from ..errors import InputFileError, UsageError
from ..families import SequenceFlag
from .block_layouts import (
    BLOCK_LAYOUTS,
    DEFAULT_BLOCK_LAYOUT,
    GROUP_BATCH_SIZE,
    BlockLayout,
    build_blocks,
    get_block_layout,
)
from .sources import DATASET_SETUPS, SharedFileSource, file_fingerprint, read_text_file

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


SPLITS = ("train", "validation")


def _layout_help(default: str | None) -> str:
    return (
        "How texts become blocks: "
        + "; ".join(f"{name}: {layout.description}" for name, layout in BLOCK_LAYOUTS.items())
        + (f" (default: {default})." if default else " (default: the layout the checkpoint was trained with).")
    )


@dataclass(frozen=True)
class DataArgs:
    """The data flags of every entry script: where the texts come from, how much of them, how they become
    blocks, and where the tokenized blocks are cached."""

    dataset_setup: str | None = arg(
        help=f"Named dataset, one of {', '.join(DATASET_SETUPS)} (enwiki_slice: local files under $OFT_SHARED, "
        "default ../shared; the others: the HF hub). Alternative: --train_file/--validation_file."
    )
    train_file: str | None = arg(help="Local text file for training (one text per line).")
    validation_file: str | None = arg(help="Local text file for validation.")
    block_layout: str | None = arg(
        DEFAULT_BLOCK_LAYOUT, _layout_help(DEFAULT_BLOCK_LAYOUT), choices=list(BLOCK_LAYOUTS)
    )
    preprocessing_num_workers: int | None = arg(help="Processes for tokenizing.", check=POSITIVE, type=int)
    overwrite_cache: bool = arg(False, "Tokenize again even if a cache exists.", action="store_true")
    data_cache_dir: str | None = arg(
        help="Where tokenized splits are cached (default: <HF datasets cache>/outlier_free_transformers)."
    )
    train_percentage: float | None = arg(help="Use the first P%% of training texts.", check=PERCENTAGE, type=float)
    validation_percentage: float | None = arg(
        help="Use the first P%% of validation texts.", check=PERCENTAGE, type=float
    )
    seq_length: int | None = from_flag(help="Tokens per block: the family's sequence-length flag, as given.")

    def file(self, split: str) -> str | None:
        return {"train": self.train_file, "validation": self.validation_file}[split]

    def percentage(self, split: str) -> float | None:
        return {"train": self.train_percentage, "validation": self.validation_percentage}[split]


def add_data_args(
    parser: FlagParser, sequence: SequenceFlag, layout_default: str | None = DEFAULT_BLOCK_LAYOUT
) -> FlagParser:
    """The data flags, with the family's sequence-length flag. `layout_default=None` (validation): no default
    layout, the checkpoint's is used."""

    def sequence_flag(group) -> None:
        group.add_argument(f"--{sequence.name}", type=int, default=sequence.default, help=sequence.help)

    layout = {"default": layout_default, "help": _layout_help(layout_default)}
    add_group(
        parser,
        "data",
        DataArgs,
        "data",
        {"block_layout": layout},
        after={"validation_file": sequence_flag},
        sources={"seq_length": sequence.name},
    )
    return parser


def check_data_sources(data: DataArgs, splits: tuple[str, ...]) -> None:
    """The data flags and files of `splits`, checked once, before anything is loaded (validation resolves a
    missing --block_layout from the checkpoint)."""
    if data.block_layout is not None:
        get_block_layout(data.block_layout)
    if data.dataset_setup is not None:
        if data.dataset_setup not in DATASET_SETUPS:
            raise UsageError(
                f"Unknown dataset setup {data.dataset_setup!r}; valid setups: {', '.join(DATASET_SETUPS)}."
            )
        local = [f"--{split}_file" for split in SPLITS if data.file(split)]
        if local:
            raise UsageError(f"--dataset_setup and {', '.join(local)} both choose the data; use one of them.")
        for split in splits:
            for source in DATASET_SETUPS[data.dataset_setup][split]:
                if isinstance(source, SharedFileSource) and not source.path.is_file():
                    raise InputFileError(
                        f"--dataset_setup {data.dataset_setup} reads {source.path}, which does not exist; set "
                        f"OFT_SHARED to the folder that holds {source.relative_path}."
                    )
    for split in splits:
        path = data.file(split)
        if data.dataset_setup is None and path is None:
            raise UsageError(f"No {split} data: pass --dataset_setup or --{split}_file.")
        if path is not None and not Path(path).is_file():
            raise InputFileError(f"--{split}_file {path} does not exist; pass the path of a text file.")
        if path is not None and Path(path).stat().st_size == 0:
            raise InputFileError(f"--{split}_file {path} is empty; pass a text file with one text per line.")


def _source_fingerprint(data: DataArgs, split: str) -> dict:
    if data.dataset_setup is not None:
        sources = DATASET_SETUPS[data.dataset_setup][split]
        return {"setup": data.dataset_setup, "sources": [source.fingerprint() for source in sources]}
    return file_fingerprint(Path(data.file(split)))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the tokenizer's output (normaliser, vocabulary, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    text += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_raw(data: DataArgs, split: str) -> Dataset:
    if data.dataset_setup is not None:
        parts = [source.load() for source in DATASET_SETUPS[data.dataset_setup][split]]
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    else:
        path = data.file(split)
        dataset = read_text_file(Path(path), f"--{split}_file {path}")
    percentage = data.percentage(split)
    if percentage is not None:
        dataset = dataset.select(range(math.ceil(len(dataset) * percentage / 100)))
    return dataset


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, layout: BlockLayout) -> dict:
    texts = [text for text in batch["text"] if text.strip()]
    if not texts:  # a batch of blank lines (the tokenizer cannot take an empty list)
        return {"input_ids": []}
    if not layout.special_tokens_per_text:
        texts = [text.strip() for text in texts]
    # verbose=False: lines longer than the model are expected here; grouping splits them into blocks.
    encoded = tokenizer(
        texts, add_special_tokens=layout.special_tokens_per_text, return_attention_mask=False, verbose=False
    )
    return {"input_ids": encoded["input_ids"]}


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "outlier_free_transformers"


def load_split(
    data: DataArgs,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_length: int,
    is_main: bool = True,
) -> Dataset:
    """The tokenized blocks of one split (a torch-formatted `input_ids` column of shape (seq_length,)).

    Only the main process tokenizes; the others must call this after it has finished (see
    `prepare_splits`), and then load the cache it wrote."""
    layout = get_block_layout(data.block_layout)
    key = {
        "version": CACHE_FORMAT_VERSION,
        "split": split,
        "source": _source_fingerprint(data, split),
        "percentage": data.percentage(split),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_length": seq_length,
        "block_layout": data.block_layout,
        "group_batch_size": GROUP_BATCH_SIZE,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(data.data_cache_dir or default_cache_dir()) / f"{split}-{digest}"
    if cache.is_dir() and not (data.overwrite_cache and is_main):
        logger.info("Loading tokenized %s split from %s", split, cache)
        return load_from_disk(str(cache)).with_format("torch")
    if not is_main:
        raise RuntimeError(f"The main process did not write the {split} cache {cache}.")
    raw = _load_raw(data, split)
    tokenized = raw.map(
        partial(_tokenize, tokenizer=tokenizer, layout=layout),
        batched=True,
        num_proc=data.preprocessing_num_workers,
        remove_columns=raw.column_names,
        desc=f"Tokenizing {split}",
    )
    blocks = build_blocks(tokenized, tokenizer, layout, seq_length, split)
    if len(blocks) == 0:
        source = data.file(split) or data.dataset_setup
        raise UsageError(
            f"The {split} data ({source}) has fewer than {seq_length} tokens: no block of that length fits; pass "
            "more text or a shorter sequence length."
        )
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    blocks.save_to_disk(str(tmp))
    (tmp / "settings.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    logger.info("Cached %d %s blocks of %d tokens in %s", len(blocks), split, seq_length, cache)
    return load_from_disk(str(cache)).with_format("torch")


def prepare_splits(
    data: DataArgs,
    splits: tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase,
    seq_length: int,
    accelerator,
) -> dict[str, Dataset]:
    """Tokenized blocks for each requested split (sources checked by the plan); the main process builds missing
    caches first."""
    result = {}
    with accelerator.main_process_first():
        for split in splits:
            result[split] = load_split(data, split, tokenizer, seq_length, is_main=accelerator.is_main_process)
    return result
