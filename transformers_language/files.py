"""The project's own files: atomic writes of text, JSON, PNG and model folders (temporary file, then rename,
with the usual permissions), strict JSON (no NaN), per-step JSON-lines logs that survive a torn last line,
and guarded reads that turn a missing or corrupt file into one clear error."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from transformers.utils import CONFIG_NAME

from .errors import InputFileError, UsageError

FINAL_TMP = ".final.tmp"  # where the final model is assembled before it is moved in


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object from one of the project's own files, or one clear error naming the file and `fix`."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise InputFileError(f"{path} is missing ({what}); {fix}.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputFileError(f"{path} is corrupt ({what}: {error}); {fix}.") from error
    if not isinstance(values, dict):
        raise InputFileError(f"{path} is corrupt ({what}: not a JSON object); {fix}.")
    return values


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """`--output_dir` as a folder path (it need not exist yet), checked before anything is loaded."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {path} is a file, not a folder; pass a folder path.")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--output_dir {path}: {parent} is a file, not a folder; pass a folder path.")
    return path


@functools.cache
def _file_mode() -> int:
    """0666 less the process's umask, read once (reading the umask means setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary binary file beside `path`, then rename it to `path`: readers never see a
    partial file. The file gets the usual permissions (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) written atomically."""
    write_atomic(path, lambda handle: handle.write(text.encode()))


def write_png_atomic(figure, path: str | os.PathLike) -> None:
    """A matplotlib figure as PNG, written atomically (an interrupted run never leaves a broken image)."""
    write_atomic(path, lambda handle: figure.savefig(handle, dpi=120, format="png"))


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a per-step JSON-lines log up to `step` (a resumed run rewrites what came after its
    checkpoint), atomically. A torn last line (the run was killed while writing it) is dropped; a corrupt line
    before it is an error."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise InputFileError(
                f"{path} line {number} is corrupt ({error}); delete the line (or the file) to resume."
            ) from error
        if record["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def strict_json(values: dict, **options) -> str:
    """JSON without NaN or infinity (not JSON, and many readers reject it): a non-finite number is null."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(values), allow_nan=False, default=str, **options)


def write_json_atomic(path: str | os.PathLike, values: dict) -> None:
    """`values` as indented strict JSON, written atomically."""
    write_text_atomic(path, strict_json(values, indent=2, sort_keys=True) + "\n")


def save_model_files(model, tokenizer, directory: Path, state_dict: dict | None, records: dict[str, dict]) -> None:
    """`save_pretrained` (safetensors) of model (with `state_dict` as its weights, when given) and tokenizer,
    and each JSON record (file name -> values) beside them."""
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    for name, values in records.items():
        write_json_atomic(Path(directory) / name, values)


def save_pretrained_atomic(
    model, tokenizer, output_dir: str | os.PathLike, state_dict: dict | None = None, records: dict | None = None
) -> None:
    """`save_model_files` into a temporary folder, then moved into `output_dir` as a set: config.json (what
    makes a folder a model to `from_pretrained`) is removed first and moved in last, so at every instant the
    folder holds the whole previous model, no model, or the whole new one, never a mix."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    save_model_files(model, tokenizer, tmp, state_dict, records or {})
    (output_dir / CONFIG_NAME).unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda item: item.name == CONFIG_NAME):
        os.replace(item, output_dir / item.name)
    tmp.rmdir()
