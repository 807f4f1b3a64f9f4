"""A study's resumable stages, as the demos run them: each method is a training stage and its validation stages
(FP, W8A8, FP on second data), each a call of a job (`pretrain`, `validate`) with its argv printed before it so
it can be repeated by hand. A method's folder keeps a record of its stages' argv (`demo_stages.json`); resuming
reads a finished method back, re-runs only the validations whose flags changed, or continues an interrupted
training from its last checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..files import write_json_atomic
from .pretrain import pretrain
from .validate import validate

SECOND_EVAL = "eval-second"  # the FP validation on the second data (WikiText-2 valid)
RECORD = "demo_stages.json"  # a method's stage arguments, and whether all of them finished
# Flags (each with one value) that change where training state is saved, never what is trained (a run with and
# without them gives the same weights bit for bit): resuming ignores them when it compares a method's stages.
BOOKKEEPING_FLAGS = ("--checkpointing_steps", "--checkpoints_total_limit")


def run_stage(
    number: int, total: int, title: str, job, objective: str, argv: list[str], family: str | None = None
) -> dict:
    """Stage `number` of `total`: print the job's call (so it can be repeated by hand), run it, print its time;
    returns the job's results."""
    which = f"'{objective}'" + (f", family_name='{family}'" if family else "")
    print(f"\n=== [{number}/{total}] {title}\n    {job.__name__}({which}, {' '.join(argv)})", flush=True)
    start = time.perf_counter()
    results = job(objective, argv, family_name=family)
    print(f"=== [{number}/{total}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return results


def method_stages(
    method: str,
    run_dir: Path,
    train_title: str,
    training: list[str],
    evaluation: list[str],
    quantize: list[str],
    fp_extra: tuple[str, ...] = (),
    second: tuple[str, ...] = (),
) -> tuple:
    """A method's stages (title, job, argv): train into `run_dir`, validate the model there in floating point
    (eval-fp/, with `fp_extra`) and in W8A8 (eval-w8a8/, with `quantize`), and with `second` (a validation's
    arguments on other data), in floating point on that data (eval-second/); `read_stage_results` reads them
    back."""
    extra = ()
    if second:
        argv = [*second, "--output_dir", str(run_dir / SECOND_EVAL)]
        extra = ((f"validate {method} (FP, second data)", validate, argv),)
    return (
        (f"{train_title}, {method}", pretrain, [*training, "--output_dir", str(run_dir)]),
        (f"validate {method} (FP)", validate, [*evaluation, *fp_extra, "--output_dir", str(run_dir / "eval-fp")]),
        (
            f"validate {method} (W8A8)",
            validate,
            [*evaluation, *quantize, "--output_dir", str(run_dir / "eval-w8a8")],
        ),
        *extra,
    )


def read_stage_results(run_dir: Path, stages: int = 3, missing_ok: bool = False) -> list[dict | None]:
    """The written results of a finished method's `stages` stages: training, FP and W8A8 evaluation, and the
    FP evaluation on the second data (`missing_ok`: None for a stage whose results are missing or torn, which
    is then re-run)."""
    results = []
    for path in (run_dir, run_dir / "eval-fp", run_dir / "eval-w8a8", run_dir / SECOND_EVAL)[:stages]:
        try:
            results.append(json.loads((path / "all_results.json").read_text()))
        except (OSError, ValueError):
            if not missing_ok:
                raise
            results.append(None)
    return results


def _results_flags(argv: list[str]) -> list[str]:
    """`argv` without the bookkeeping flags and their values."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in BOOKKEEPING_FLAGS:
            skip = True
        else:
            kept.append(item)
    return kept


def plan_method(run_dir: Path, stages: list[list[str]], resume: bool) -> tuple[str, list[int]]:
    """('done', []) finished with these stages: read back; ('validate', stage numbers) the training is finished
    with these flags and only those validation stages changed: re-run them alone; ('continue', []) an interrupted
    training of these stages with a checkpoint; ('fresh', []) any earlier run there is removed (training refuses
    a folder that holds a run)."""
    record_path = run_dir / RECORD
    try:
        record = json.loads(record_path.read_text()) if resume and record_path.is_file() else None
    except ValueError:  # a torn record: start over
        record = None
    if record is not None and record["finished"] and _results_flags(record["stages"][0]) == _results_flags(stages[0]):
        before = record["stages"]
        changed = [  # a stage added since (the second data's validation) counts as changed
            number
            for number in range(1, len(stages))
            if number >= len(before) or _results_flags(before[number]) != _results_flags(stages[number])
        ]
        return ("validate", changed) if changed else ("done", [])
    if record is not None and record["stages"] == stages and any(run_dir.glob("step_*")):
        return "continue", []
    if run_dir.exists():
        print(f"Replacing the earlier demo run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    return "fresh", []


def run_method(
    method: str,
    run_dir: Path,
    stages,
    objective: str,
    resume: bool,
    counter: tuple[int, int],
    family: str | None = None,
) -> list:
    """Run a method's stages (title, job, argv) in `run_dir` (stage numbers from `counter`: done so far, total)
    for `objective` and `family` (None: the objective's first), or read back their results when `resume` finds
    them finished with the same flags; returns each stage's results."""
    argvs = [argv for _, _, argv in stages]
    state, changed = plan_method(run_dir, argvs, resume)
    if state == "done":
        print(f"\n=== {method}: finished earlier with these flags, read back from {run_dir}", flush=True)
        return read_stage_results(run_dir, len(stages))
    done, total = counter
    if state == "validate":
        print(f"\n=== {method}: the trained model is kept; re-running only the changed validations", flush=True)
        results = read_stage_results(run_dir, len(stages), missing_ok=True)
        for number in sorted(set(changed) | {n for n, stage in enumerate(results) if n > 0 and stage is None}):
            title, job, argv = stages[number]
            results[number] = run_stage(done + number + 1, total, title, job, objective, argv, family)
        write_json_atomic(run_dir / RECORD, {"stages": argvs, "finished": True})
        return results
    if state == "continue":
        print(f"\n=== {method}: continuing the interrupted training in {run_dir}", flush=True)
        stages = ((stages[0][0], stages[0][1], [*argvs[0], "--resume_from_checkpoint", "latest"]), *stages[1:])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RECORD, {"stages": argvs, "finished": False})
    results = [
        run_stage(done + number, total, title, job, objective, argv, family)
        for number, (title, job, argv) in enumerate(stages, start=1)
    ]
    write_json_atomic(run_dir / RECORD, {"stages": argvs, "finished": True})
    return results
