"""Run an entry point with one injected fault (used by tests/test_faults.py, in a subprocess):

    python tests/fault_harness.py FAULT SCRIPT [ARGS...]

FAULT is `kill_in_checkpoint:N` (SIGKILL once the model files of step_N.tmp are written, before accelerate
writes the optimizer and random states) or `kill_in_final_save` (SIGKILL after the final model's weights are
moved into place, before its config.json is). The process dies as under `kill -9`: no cleanup runs.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_checkpoint(step: str) -> None:
    import transformers_language.training.checkpoints as checkpoints

    real = checkpoints.save_model_files

    def save_model_files(model, tokenizer, directory, *rest):
        real(model, tokenizer, directory, *rest)
        if Path(directory).name == f"step_{step}.tmp":
            _die()

    checkpoints.save_model_files = save_model_files


def kill_in_final_save() -> None:
    real = os.replace

    def replace(source, destination):
        real(source, destination)
        if Path(source).parent.name == ".final.tmp" and Path(destination).name == "model.safetensors":
            _die()

    os.replace = replace


FAULTS = {"kill_in_checkpoint": kill_in_checkpoint, "kill_in_final_save": kill_in_final_save}

if __name__ == "__main__":
    fault, script, *args = sys.argv[1:]
    name, _, value = fault.partition(":")
    FAULTS[name](*([value] if value else []))
    sys.argv = [script, *args]
    runpy.run_path(str(REPO / script), run_name="__main__")
