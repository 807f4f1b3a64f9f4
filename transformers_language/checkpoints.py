"""Step-named training checkpoints (accelerate state) and atomic writes of results and the final model.

A checkpoint is written to `step_N.tmp` and renamed to `step_N` only when every process has finished, so a
run killed while saving never leaves a half-written `step_N` behind, and `latest` always means a complete
one. Older checkpoints beyond the limit are removed after the new one is in place. Every `step_N` is also a
loadable model: accelerate's model-state hooks write the weights with `save_pretrained` (config.json,
safetensors, tokenizer and the layout record beside the training state) and read them back on resume, so
`validate_*.py --model_name_or_path RUN/step_N` evaluates the model as it was at step N.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file
from transformers.utils import SAFE_WEIGHTS_NAME  # save_pretrained's single-file weights (our models fit one)

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


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a per-step JSON-lines log up to `step` (a resumed run rewrites what came after its
    checkpoint), atomically."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def write_json_atomic(path: str | os.PathLike, values: dict) -> None:
    """`values` as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")


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
    """`save_model_files` into a temporary folder, then move each file into `output_dir` by rename, so an
    interrupted save leaves the previous files intact."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".final.") as tmp:
        save_model_files(model, tokenizer, Path(tmp), state_dict, records or {})
        for item in Path(tmp).iterdir():
            os.replace(item, output_dir / item.name)


def model_state_dict(accelerator, loss_module) -> dict:
    """The full weights of the model inside a prepared loss module, keyed as the model's own (under FSDP every
    process must call this: it gathers the shards)."""
    return {key.removeprefix("model."): value for key, value in accelerator.get_state_dict(loss_module).items()}


def _load_model_weights(model, path: Path) -> None:
    """Load `save_pretrained` weights into `model` in place; a weight may be missing only where it is tied to
    one that was loaded (save_pretrained writes a tied head once)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} has no {SAFE_WEIGHTS_NAME}; resume from a step_N written by this version."
        )
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[key].data_ptr() for key in state if key in current}
    untied = [key for key in result.missing_keys if current[key].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit this model (missing {untied}, unexpected {result.unexpected_keys}); resume with the "
            "settings that wrote it."
        )


def register_model_checkpointing(accelerator, loss_module, tokenizer, records: dict[str, dict]) -> None:
    """Make every `save_state` checkpoint a loadable model: the model's weights go through `save_pretrained`
    (with tokenizer and records) instead of accelerate's own weights file, and `load_state` reads them back.
    Under FSDP accelerate keeps its sharded files for resuming, and the gathered weights are written beside."""

    unwrapped = accelerator.unwrap_model(loss_module)

    def ours(models) -> int | None:  # where the loss module sits in accelerate's list (wrapped or not)
        found = [i for i, model in enumerate(models) if accelerator.unwrap_model(model) is unwrapped]
        return found[0] if found else None

    def save_hook(models, weights, output_dir):
        state_dict = model_state_dict(accelerator, loss_module)
        if accelerator.is_main_process:
            save_model_files(unwrapped.model, tokenizer, Path(output_dir), state_dict, records)
        if weights:  # not under FSDP: one weights entry per prepared model, ours is written above
            weights.pop(ours(models))

    def load_hook(models, input_dir):
        index = ours(models)
        if index is not None:  # not under FSDP, which loads its own shards
            _load_model_weights(unwrapped.model, Path(input_dir) / SAFE_WEIGHTS_NAME)
            models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
