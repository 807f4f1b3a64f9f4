"""The project's own files: atomic writes (temporary file, then rename, with the usual permissions), strict
JSON (no NaN), per-step JSON-lines logs that survive a torn last line, and guarded reads that turn a missing
or corrupt file into one clear error."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .errors import InputFileError, UsageError


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


def _file_mode() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename: readers never see a partial file. The file
    gets the usual permissions (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
