"""Step-named training checkpoints (accelerate state plus JSON records) and the set-atomic final model.

A checkpoint is written to `step_N.tmp` and renamed to `step_N` only when every process has finished, so a
run killed while saving never leaves a half-written `step_N` behind, and `latest` always means a complete
one. Older checkpoints of the same run beyond the limit are removed after the new one is in place. The step
and its loss are JSON (`training_state.json`) and the run's settings sit beside them; the only pickles are
accelerate's optimizer and random states, read with weights_only=True. Every `step_N` is also a
loadable model: accelerate's model-state hooks write the weights with `save_pretrained` (config.json,
safetensors, tokenizer and the layout record beside the training state) and read them back on resume, so
`validate_*.py --model_name_or_path RUN/step_N` evaluates the model as it was at step N.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.modeling_utils import revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_NAME  # save_pretrained's weights file

from ..errors import InputFileError, OutputWriteError, UsageError
from ..files import save_model_files, write_json_atomic

_STEP_DIR = re.compile(r"^step_(\d+)$")


TRAINING_STATE = "training_state.json"  # step and last loss: JSON, so resuming unpickles nothing of ours
RUN_SETTINGS = "run_settings.json"  # the settings of the run, in its folder and in each of its checkpoints
# accelerate's per-process random states: the one pickle a checkpoint holds, loaded with weights_only=True.
_RANDOM_STATES = re.compile(r"^random_states_\d+\.pkl$")


class TrainingProgress:
    """The optimizer-step counter and the loss of that step, saved with each checkpoint (epoch, position in
    the epoch and learning rate follow from the step)."""

    def __init__(self):
        self.step = 0
        self.loss: float | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss = int(state["step"]), state["loss"]


def checkpoint_dirs(output_dir: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (with `run_id`: only those of that run)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    paths = [path for _, path in sorted(found)]
    return paths if run_id is None else [path for path in paths if checkpoint_run_id(path) == run_id]


def checkpoint_run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / RUN_SETTINGS).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_resume(resume_from: str, output_dir: str | os.PathLike) -> Path:
    """`latest` (the newest checkpoint in output_dir) or an explicit checkpoint directory, which must be a
    training checkpoint of this version."""
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise InputFileError(
                f"--resume_from_checkpoint latest: no step_N checkpoint in {output_dir}; pass a checkpoint path."
            )
        path = found[-1]
    else:
        path = Path(resume_from)
    if not (path / TRAINING_STATE).is_file():
        raise InputFileError(
            f"--resume_from_checkpoint {resume_from}: {path} is not a training checkpoint of this version (a step_N "
            f"directory with {TRAINING_STATE}, written with --checkpointing_steps); pass one, or 'latest'."
        )
    return path


def check_checkpoint_files(checkpoint: Path, process_index: int) -> None:
    """Refuse what resuming must not load: any pickle but accelerate's random states (a checkpoint of this
    project holds no other), and a random-state file that does not load (accelerate would skip it with an
    INFO line, and the resumed run would quietly stop repeating the uninterrupted one)."""
    from accelerate.utils import load  # torch.load with weights_only=True and numpy's RNG types allowed

    pickles = sorted(p.name for p in checkpoint.glob("*.pkl") if not _RANDOM_STATES.match(p.name))
    if pickles:
        raise InputFileError(
            f"{checkpoint} holds {', '.join(pickles)}: pickles this project never writes and will not load (a "
            "pickle can run code); resume from a checkpoint written by this version."
        )
    states = checkpoint / f"random_states_{process_index}.pkl"
    try:
        load(states)
    except Exception as error:  # any failure: the states cannot be restored
        raise InputFileError(
            f"{states} is missing or corrupt ({type(error).__name__}); the run cannot resume exactly from "
            f"{checkpoint.name}: resume from an earlier checkpoint."
        ) from error


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, keep: int, records: dict[str, dict], run_id: str
) -> Path:
    """accelerate `save_state` into `step_{step}` with the JSON `records` beside it (all processes call this),
    keeping the newest `keep` checkpoints of this run (another run's are never touched)."""
    final = Path(output_dir) / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            for name, values in records.items():
                write_json_atomic(tmp / name, values)
    except OSError as error:  # a full disk or quota: the earlier checkpoints are intact, this one is dropped
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(
            f"Writing the checkpoint {final.name} into {Path(output_dir)} failed ({error.strerror or error}); the "
            "earlier checkpoints are intact: free space there, then resume with --resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir, run_id)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def model_state_dict(accelerator, loss_module) -> dict:
    """The full weights of the model inside a prepared loss module, keyed as the model's own (under FSDP every
    process must call this: it gathers the shards)."""
    return {key.removeprefix("model."): value for key, value in accelerator.get_state_dict(loss_module).items()}


def load_weights(path: Path, fix: str) -> dict:
    """The tensors of a safetensors file, or one clear error naming it (a truncated or corrupt file)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise InputFileError(f"{path} is corrupt or truncated ({error}); {fix}.") from error


def _own_names(model, state: dict) -> dict:
    """`state` as `save_pretrained` wrote it, under the model's own parameter names: HF saves some families in
    their original layout (ViT's `encoder.layer.N.attention.attention.query` for `layers.N.attention.q_proj`)."""
    own = model.state_dict()
    saved_as = revert_weight_conversion(model, dict(own))  # the model's own tensors under their saved names
    by_tensor = {id(tensor): name for name, tensor in own.items()}
    rename = {saved: by_tensor[id(tensor)] for saved, tensor in saved_as.items() if id(tensor) in by_tensor}
    return {rename.get(name, name): tensor for name, tensor in state.items()}


def _load_model_weights(model, path: Path) -> None:
    """Load `save_pretrained` weights into `model` in place; a weight may be missing only where it is tied to
    one that was loaded (save_pretrained writes a tied head once)."""
    if not path.is_file():
        raise InputFileError(f"{path.parent} has no {SAFE_WEIGHTS_NAME}; resume from a step_N written by this version.")
    state = _own_names(model, load_weights(path, "resume from an earlier checkpoint"))
    result = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[key].data_ptr() for key in state if key in current}
    untied = [key for key in result.missing_keys if current[key].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise UsageError(
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
