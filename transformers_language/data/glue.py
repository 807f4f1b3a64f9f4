"""GLUE tasks for fine-tuning and evaluating BERT-family models: the task table, the data flags, the examples.

A task's examples come from the GLUE TSV files of its folder (`--data_dir`: train.tsv, dev.tsv, as GLUE's
download script writes them), from one TSV file per split (`--train_file`, `--validation_file`), or from the
hub's `nyu-mll/glue`. Each example is tokenized once as a sentence (pair) of at most `--max_seq_length` tokens,
truncated longest-first as HF's run_glue does, and kept at its own length (or padded to `--max_seq_length`
with `--pad_to_max_length`); `pad_batch` pads a batch to its longest example, so padding costs only what a batch
needs, and its attention mask keeps padding out of every statistic (quantization/token_mask.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from ..arguments import POSITIVE, FlagParser, add_group, arg, from_flag
from ..errors import InputFileError
from ..families import SequenceFlag
from ..glue_tasks import GLUE_TASKS, GlueTask, get_task

HUB_DATASET = "nyu-mll/glue"
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


@dataclass(frozen=True)
class GlueDataArgs:
    """The data flags of run_glue.py / validate_glue.py: the task, where its examples come from, how many."""

    task_name: str = arg(None, "The GLUE task.", choices=list(GLUE_TASKS), required=True)
    data_dir: str | None = arg(
        help="The task's folder of GLUE TSV files (train.tsv, dev.tsv), e.g. ../shared/data/glue/RTE. Default: the "
        f"hub's {HUB_DATASET}, unless --train_file / --validation_file."
    )
    train_file: str | None = arg(help="The training examples: a TSV file in the task's GLUE layout.")
    validation_file: str | None = arg(help="The evaluation examples: a TSV file in the task's GLUE layout (dev).")
    max_train_samples: int | None = arg(help="Use the first N training examples.", check=POSITIVE, type=int)
    max_eval_samples: int | None = arg(help="Use the first N evaluation examples.", check=POSITIVE, type=int)
    pad_to_max_length: bool = arg(
        False, "Pad every batch to --max_seq_length (default: to its longest example).", action="store_true"
    )
    seq_length: int | None = from_flag(help="Tokens per example at most: the family's sequence-length flag.")

    def file(self, split: str) -> Path | None:
        """The TSV file of `split` (None: the hub's)."""
        given = {"train": self.train_file, "validation": self.validation_file}[split]
        if given is not None:
            return Path(given)
        return Path(self.data_dir) / SPLIT_FILES[split] if self.data_dir is not None else None

    def limit(self, split: str) -> int | None:
        return {"train": self.max_train_samples, "validation": self.max_eval_samples}[split]


def add_glue_data_args(parser: FlagParser, sequence: SequenceFlag) -> FlagParser:
    def sequence_flag(group) -> None:
        group.add_argument(f"--{sequence.name}", type=int, default=sequence.default, help=sequence.help)

    add_group(
        parser,
        "data",
        GlueDataArgs,
        "data",
        after={"validation_file": sequence_flag},
        sources={"seq_length": sequence.name},
    )
    return parser


def check_glue_sources(data: GlueDataArgs, splits: tuple[str, ...]) -> None:
    """The task's files of `splits`, checked once before anything loads (their header too)."""
    task = get_task(data.task_name)
    if data.data_dir is not None and not Path(data.data_dir).is_dir():
        raise InputFileError(f"--data_dir {data.data_dir} is not a folder; pass the task's GLUE folder.")
    for split in splits:
        path = data.file(split)
        if path is None:
            continue
        given = {"train": data.train_file, "validation": data.validation_file}[split]
        flag = f"--{split}_file" if given is not None else "--data_dir"
        if not path.is_file():
            raise InputFileError(f"{flag}: {path} does not exist; pass the task's {SPLIT_FILES[split]}.")
        if task.has_header:
            header = _read_rows(path)[0]
            missing = [name for name in (*task.tsv_texts, task.tsv_label) if name not in header]
            if missing:
                raise InputFileError(
                    f"{flag}: {path} has no column {', '.join(map(repr, missing))} (its header: {', '.join(header)}); "
                    f"pass {task.folder}'s GLUE TSV file for --task_name {data.task_name}."
                )


def _read_rows(path: Path) -> list[list[str]]:
    """The rows of a GLUE TSV file: tab-separated, no quoting (its texts hold bare quotes), a BOM dropped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            return list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path} is not UTF-8 text ({error.reason}); pass the GLUE TSV file.") from error


def _label(task: GlueTask, value: str, where: str) -> float | int:
    try:
        if task.labels is None:
            return float(value)
        if task.tsv_label_names is not None:
            return task.tsv_label_names.index(value)
        label = int(value)
        if not 0 <= label < len(task.labels):
            raise ValueError(value)
        return label
    except ValueError as error:
        names = task.tsv_label_names or [str(index) for index in range(task.num_labels)]
        expected = "a number" if task.labels is None else ", ".join(names)
        raise InputFileError(f"{where}: label {value!r} is not {expected}.") from error


def read_tsv(task: GlueTask, path: Path) -> Dataset:
    """A task's TSV file as a dataset of the hub's columns (texts, `label`)."""
    rows = _read_rows(path)
    if task.has_header:
        header, rows = rows[0], rows[1:]
        texts = [header.index(name) for name in task.tsv_texts]
        label = header.index(task.tsv_label)
    else:
        texts, label = list(task.tsv_texts), task.tsv_label
    width = max(*texts, label) + 1
    columns = {name: [] for name in (*task.text_columns, "label")}
    for number, row in enumerate(rows, start=2 if task.has_header else 1):
        if not row:
            continue
        if len(row) < width:
            raise InputFileError(f"{path} line {number}: {len(row)} columns, expected at least {width}.")
        for name, index in zip(task.text_columns, texts, strict=True):
            columns[name].append(row[index])
        columns["label"].append(_label(task, row[label], f"{path} line {number}"))
    return Dataset.from_dict(columns)


def load_examples(data: GlueDataArgs, split: str) -> Dataset:
    """The raw examples of `split` (texts and `label`), the first --max_*_samples of them."""
    task = get_task(data.task_name)
    path = data.file(split)
    # (the hub's split names are ours)
    dataset = read_tsv(task, path) if path is not None else load_dataset(HUB_DATASET, data.task_name, split=split)
    limit = data.limit(split)
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def tokenize_examples(
    examples: Dataset,
    task: GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    pad: bool = False,
    lazy: bool = False,
) -> Dataset:
    """input_ids, attention_mask (and token_type_ids) of each example at its own length (with `pad`: padded to
    `max_length`), and `labels`. `lazy`: each example is tokenized when it is read (a split of which only a
    sample is used, such as the training split a validation calibrates on), with the same result."""

    def encode(batch: dict) -> dict:
        texts = [batch[name] for name in task.text_columns]
        padding = "max_length" if pad else False
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, padding=padding)
        return dict(encoded) | {"labels": batch["label"]}

    if lazy:
        return examples.with_transform(encode)
    # A fingerprint from what decides the result: without it, datasets hashes `encode` by pickling the tokenizer
    # (about a second per call).
    settings = json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str)
    identity = f"{examples._fingerprint}|{task.text_columns}|{type(tokenizer).__name__}|{len(tokenizer)}|{settings}"
    identity += f"|{max_length}|{pad}"
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return examples.map(
        encode, batched=True, remove_columns=examples.column_names, desc="Tokenizing", new_fingerprint=fingerprint
    )
