"""Where pre-training text comes from: the named dataset setups (`--dataset_setup`), each split a list of HF hub
datasets or text files in the shared data folder, and the fingerprints that key the tokenized cache."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from ..errors import InputFileError


@dataclass(frozen=True)
class HubSource:
    """One split of a dataset on the HF hub (parquet / arrow data, no dataset script)."""

    path: str
    name: str | None
    split: str
    text_column: str = "text"

    def fingerprint(self) -> dict:
        return asdict(self)

    def load(self) -> Dataset:
        dataset = load_dataset(self.path, self.name, split=self.split)
        return dataset.select_columns([self.text_column]).rename_column(self.text_column, "text")


def file_fingerprint(path: Path) -> dict:
    """What decides a local text file's tokenized blocks, as a cache key: its resolved path, size and mtime."""
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}


def read_text_file(path: Path, label: str) -> Dataset:
    """A local text file as a dataset of lines (`text` column); `label` names it in the one-line error for a file
    that is not UTF-8 or cannot be read."""
    try:
        return load_dataset("text", data_files={"split": str(path)}, split="split")
    except DatasetGenerationError as error:
        cause = error.__cause__
        if isinstance(cause, UnicodeDecodeError):
            raise InputFileError(
                f"{label} is not UTF-8 text ({cause.reason} in byte {cause.start} of a chunk); "
                "convert it to UTF-8 (e.g. iconv -t UTF-8)."
            ) from error
        raise InputFileError(f"{label} cannot be read as text ({cause!r}).") from error


def shared_folder() -> Path:
    """The shared data folder beside the checkout (`../shared`), or `$OFT_SHARED`."""
    return Path(os.environ.get("OFT_SHARED", Path(__file__).resolve().parents[3] / "shared"))


@dataclass(frozen=True)
class SharedFileSource:
    """One split of a corpus kept as a text file (one paragraph per line) in the shared data folder."""

    relative_path: str

    @property
    def path(self) -> Path:
        return shared_folder() / self.relative_path

    def fingerprint(self) -> dict:
        return file_fingerprint(self.path)

    def load(self) -> Dataset:
        return read_text_file(self.path, str(self.path))


DATASET_SETUPS: dict[str, dict[str, tuple[HubSource | SharedFileSource, ...]]] = {
    "wikitext_2": {
        "train": (HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),),
        "validation": (HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),),
    },
    "wikitext_103": {
        "train": (HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "train"),),
        "validation": (HubSource("Salesforce/wikitext", "wikitext-103-raw-v1", "validation"),),
    },
    # BookCorpus has no validation split: the last 1% of the Wikipedia articles is held out instead.
    "bookcorpus_and_wiki": {
        "train": (
            HubSource("rojagtap/bookcorpus", None, "train"),
            HubSource("wikimedia/wikipedia", "20231101.en", "train[:99%]"),
        ),
        "validation": (HubSource("wikimedia/wikipedia", "20231101.en", "train[99%:]"),),
    },
    # 9.0M words of English Wikipedia in local files (its test split: --validation_file .../test.txt).
    "enwiki_slice": {
        "train": (SharedFileSource("data/enwiki-slice/train.txt"),),
        "validation": (SharedFileSource("data/enwiki-slice/valid.txt"),),
    },
}
