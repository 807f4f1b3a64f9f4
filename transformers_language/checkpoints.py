"""Step-named training checkpoints (accelerate state) and atomic writes of results and the final model.

A checkpoint is written to `step_N.tmp` and renamed to `step_N` only when every process has finished, so a
run killed while saving never leaves a half-written `step_N` behind, and `latest` always means a complete
one. Older checkpoints beyond the limit are removed after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")


class TrainingProgress:
    """The optimizer-step counter, saved with each checkpoint (epoch and position follow from it)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume(resume_from: str, output_dir: str | os.PathLike) -> Path:
    """`latest` (the newest checkpoint in output_dir) or an explicit checkpoint directory."""
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no step_N checkpoint in {output_dir}; pass a checkpoint path."
            )
        return found[-1]
    path = Path(resume_from)
    if not (path / "custom_checkpoint_0.pkl").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from} is not a training checkpoint (a step_N directory written with "
            "--checkpointing_steps); pass one, or 'latest'."
        )
    return path


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """accelerate `save_state` into `step_{step}` (all processes call this), keeping the newest `keep`."""
    final = Path(output_dir) / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, values: dict) -> None:
    """`values` as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")


def save_pretrained_atomic(model, tokenizer, output_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
    """`save_pretrained` (safetensors) of model (with `state_dict` as its weights, when given) and tokenizer
    into a temporary folder, then move each file into `output_dir` by rename, so an interrupted save leaves the
    previous files intact."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".final.") as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, output_dir / item.name)
