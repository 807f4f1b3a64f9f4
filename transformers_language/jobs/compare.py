"""The comparison job behind `scripts/compare_quantization.py`: every checkpoint in FP and under each recipe of
PTQ_METHODS at each bit setting, over calibration draws, each run a call of the family's validation job in this
process; a finished run is one atomic record (`compare_run.json`: argv, checkpoint identity, seconds, results)
that `resume` reads back when argv and checkpoint match. Writes comparison.md / .json / .png."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoConfig

from ..errors import UsageError
from ..families import Family
from ..files import write_json_atomic, write_text_atomic
from ..glue_tasks import GLUE_TASKS, TASK_KEY
from ..models.model_classes import family_of_config
from ..objectives import get_objective
from ..ptq.quant_args import QuantizationArgs
from ..ptq.recipes import BIT_SETTINGS, PTQ_METHODS
from .comparison_table import Headline, comparison_table, gap_panels, mean_and_spread

DEFAULT_BITS = ("W8A8", "W6A6", "W4A8")
DEFAULT_DRAWS = 3  # calibration samples per cell: on a model with outliers one draw cannot rank close recipes
RUN_RECORD = "compare_run.json"  # a finished run's argv, checkpoint identity, time and results: one atomic unit
REDUCED = ("--est_num_batches", "2")
# In reduced mode, the share of the evaluation data each kind of checkpoint reads (by objective).
REDUCED_DATA = {
    "mlm": ("--validation_percentage", "10"),
    "clm": ("--validation_percentage", "10"),
    "glue": ("--max_eval_samples", "200"),
}
# In reduced mode, what a recipe's own search gets (only where the recipe has that search).
REDUCED_BY_FLAG = {
    "--os_plus": ("--os_plus_grid", "5"),
    "--token_clipping": ("--token_clipping_quantiles", "1.0", "0.999", "0.99"),
}

Run = tuple[str, str, str, int]  # checkpoint, bit setting ("FP" for the float run), recipe, calibration draw


@dataclass(frozen=True)
class Comparison:
    """One comparison: the checkpoints (one objective), the bit settings and recipes, calibration draws per cell,
    the validation flags every run gets (`passed`), and where the GLUE tasks' files are."""

    checkpoints: list[str]
    output_dir: Path
    bits: list[str]
    recipes: list[str]
    draws: int = DEFAULT_DRAWS
    passed: list[str] = field(default_factory=list)
    glue_dir: str | None = None
    reduced: bool = False
    resume: bool = False


def owned_flags(reduced: bool) -> set[str]:
    """The validate_*.py flags each run gets from the comparison itself, which the passed flags may not repeat."""
    owned = {"--model_name_or_path", "--output_dir", "--quantize", "--n_bits", "--n_bits_act", "--calibration_seed"}
    owned |= {"--n_bits_kv", "--no_act_quant", "--task_name", "--data_dir"}  # bit settings; a GLUE checkpoint's task
    owned |= {
        flag for method in PTQ_METHODS.values() for flag in (*method.flags, *method.act_flags) if flag.startswith("--")
    }
    if reduced:
        owned |= {flag for flag in (*REDUCED, *(f for data in REDUCED_DATA.values() for f in data)) if flag[:2] == "--"}
        owned |= {flag for extra in REDUCED_BY_FLAG.values() for flag in extra if flag.startswith("--")}
    return owned


def checkpoint_kind(checkpoint: str) -> tuple[Family, str | None]:
    """The family of a saved model and, for a GLUE model, its task."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise UsageError(f"{checkpoint}: no config.json; pass folders written by run_mlm / run_clm / run_glue.")
    config = AutoConfig.from_pretrained(checkpoint)
    return family_of_config(config), getattr(config, TASK_KEY, None)


def applies(recipe: str, family: Family, bits: str | None = None) -> bool:
    """Whether `family` can take `recipe` (OS+'s shift needs biases in the norms and their readers; QuaRot a
    pre-norm family), and at the bit setting `bits` if given (PTQMethod.fits)."""
    method = PTQ_METHODS[recipe]
    if bits is not None and not method.fits(BIT_SETTINGS[bits]):
        return False
    if "--quarot" in method.flags and family.wiring.rotation is None:
        return False
    return "--os_plus" not in method.flags or family.wiring.norm_bias


def task_flags(kind: tuple[Family, str | None], glue_dir: str | None) -> list[str]:
    """A GLUE checkpoint's own task, and its folder under `glue_dir`."""
    _, task = kind
    if task is None:
        return []
    folder = [] if glue_dir is None else ["--data_dir", str(Path(glue_dir) / GLUE_TASKS[task].folder)]
    return ["--task_name", task, *folder]


def float_argv(passed: list[str]) -> list[str]:
    """`passed` without what only configures --quantize (the calibration data and the W8A8 flags), which the
    FP run refuses."""
    arity = {"--train_file": 1, "--train_percentage": 1, "--max_train_samples": 1}
    for item in fields(QuantizationArgs):
        options = item.metadata["options"]
        arity[f"--{item.name}"] = 0 if options.get("action") == "store_true" else options.get("nargs", 1)
    kept, index = [], 0
    while index < len(passed):
        flag = passed[index]
        count = arity.get(flag.split("=")[0]) if flag.startswith("--") else None
        index += 1
        if count is None:
            kept.append(flag)
        elif "=" not in flag:
            while count and index < len(passed) and not passed[index].startswith("--"):
                index += 1
                count = count if count == "+" else count - 1
    return kept


def recipe_flags(recipe: str, bits: str, reduced: bool, draw: int = 0) -> list[str]:
    """The validation flags of `recipe` at the bit setting `bits`, calibrated on draw `draw`."""
    flags = [*PTQ_METHODS[recipe].validate_flags(BIT_SETTINGS[bits]), "--calibration_seed", str(draw)]
    if reduced:
        flags += [*REDUCED, *(extra for flag, more in REDUCED_BY_FLAG.items() if flag in flags for extra in more)]
    return flags


def read_record(path: Path) -> dict:
    """A finished run's record, or {} when it is missing, truncated or not a record (the run is then redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    results = record.get("results") if isinstance(record, dict) else None
    figure = record.get("figure") if isinstance(record, dict) else None
    return record if isinstance(results, dict) and figure in results else {}


def fingerprint(checkpoint: str) -> dict[str, list[int]]:
    """(size, modification time) of each file of a checkpoint folder: a retrained checkpoint is not resumed."""
    files = sorted(item for item in Path(checkpoint).iterdir() if item.is_file())
    return {item.name: [item.stat().st_size, item.stat().st_mtime_ns] for item in files}


def _finite_or_nan(value) -> float:
    """A figure as read back from strict JSON, where a non-finite number is null."""
    return math.nan if value is None else float(value)


def _choices(results: dict) -> dict:
    """What a run's searches chose: LLM.int8()'s FP-channel share, the clipping quantile, OS+'s thresholds."""
    chosen = {}
    if "llm_int8_mean_float_channel_share" in results:
        chosen["llm_int8_float_channel_share"] = results["llm_int8_mean_float_channel_share"]
    if "token_clipping" in results:
        chosen["token_clipping_quantile"] = results["token_clipping"]["quantile"]
    os_plus = results.get("equivalent_transforms", {}).get("os_plus")
    if os_plus:
        chosen["os_plus_scaled_channels"] = sum(site["scaled_channels"] for site in os_plus.values())
    return chosen


def _planned_runs(comparison: Comparison, kinds: dict) -> list[Run]:
    """The FP run of each checkpoint, then every (checkpoint, bits, recipe, draw) the family and bits can take;
    what is left out is said once."""
    runs = [(checkpoint, "FP", "fp", 0) for checkpoint in comparison.checkpoints]
    runs += [
        (checkpoint, bits, recipe, draw)
        for checkpoint in comparison.checkpoints
        for bits in comparison.bits
        for recipe in comparison.recipes
        for draw in range(comparison.draws)
        if applies(recipe, kinds[checkpoint][0], bits)
    ]
    for checkpoint in comparison.checkpoints:
        skipped = [recipe for recipe in comparison.recipes if not applies(recipe, kinds[checkpoint][0])]
        if skipped:
            print(f"{checkpoint}: {', '.join(skipped)} not run (the family cannot take them: n/a).")
    for bits in comparison.bits:
        unfit = [recipe for recipe in comparison.recipes if not PTQ_METHODS[recipe].fits(BIT_SETTINGS[bits])]
        if unfit:
            print(f"{bits}: {', '.join(unfit)} not run (a number format of other bits, or FP activations: n/a).")
    return runs


def _rows(draws: dict, kinds: dict, headline: Headline) -> list[dict]:
    """One row per (checkpoint, bits, recipe): the mean over its draws, their spread, the gap to FP."""
    rows, fp = [], {}
    for (checkpoint, bits, recipe), done_draws in draws.items():
        values = [value for value, _, _ in done_draws]
        value, spread = mean_and_spread(values)
        fp.setdefault(checkpoint, value)  # each checkpoint's FP run comes first
        gap, gap_text = headline.gap(value, fp[checkpoint])
        rows.append(
            {
                "checkpoint": Path(checkpoint).name,
                "path": checkpoint,
                "task": kinds[checkpoint][1],
                "bits": bits,
                "recipe": recipe,
                "figure": headline.key,
                "value": value,
                "spread": spread,
                "draws": values,
                "gap": gap,
                "gap_text": gap_text,
                "draw_gaps": [headline.gap(v, fp[checkpoint])[0] for v in values],
                "seconds": sum(seconds for _, seconds, _ in done_draws),
                **_choices(done_draws[0][2]),
            }
        )
    return rows


def compare(comparison: Comparison) -> list[dict]:
    """Run (or, resuming, read back) every planned run, then write comparison.md / .json / .png under
    `comparison.output_dir`. Returns the table's rows."""
    from ..evaluation.plots import write_quantization_comparison
    from .validate import validate

    kinds = {checkpoint: checkpoint_kind(checkpoint) for checkpoint in comparison.checkpoints}
    objectives = {checkpoint: family.objective for checkpoint, (family, _) in kinds.items()}
    if len(set(objectives.values())) > 1:
        raise UsageError(
            "Compare checkpoints of one objective (OPT and Llama may share a table; other figures are of different "
            "tasks): " + ", ".join(f"{c} ({objective})" for c, objective in objectives.items())
        )
    objective = get_objective(next(iter(objectives.values())))
    headline = Headline(objective.reported[0][0], objective.higher_is_better)
    output = Path(comparison.output_dir)
    shared = [*comparison.passed, *(REDUCED_DATA.get(objective.name, ()) if comparison.reduced else ())]
    runs = _planned_runs(comparison, kinds)
    draws, caches, sample_free = {}, {}, set()
    fingerprints = {c: fingerprint(c) for c in comparison.checkpoints}
    start_all = time.perf_counter()
    ran = 0
    for checkpoint, bits, recipe, draw in tqdm(runs, desc="Runs", unit="run"):
        if draw and (checkpoint, bits, recipe) in sample_free:
            continue  # its first draw read no calibration sample: every other draw is that run again
        ran += 1
        start = time.perf_counter()
        run_dir = output / Path(checkpoint).name / bits / recipe / (f"draw_{draw}" if bits != "FP" else "")
        argv = ["--model_name_or_path", checkpoint, "--output_dir", str(run_dir)]
        argv += task_flags(kinds[checkpoint], comparison.glue_dir)
        if bits == "FP":
            argv += float_argv(shared)
        else:
            argv += [*shared, *recipe_flags(recipe, bits, comparison.reduced, draw)]
        done = run_dir / RUN_RECORD
        identity = {"argv": argv, "checkpoint_files": fingerprints[checkpoint]}
        previous = read_record(done) if comparison.resume else {}
        if previous and {key: previous.get(key) for key in identity} == json.loads(json.dumps(identity)):
            results, elapsed = previous["results"], previous.get("seconds", math.nan)
        else:
            done.unlink(missing_ok=True)  # the run's folder is being rewritten: no stale record may pair with it
            # The transforms' float statistics depend on the calibration sample: one cache per checkpoint and draw.
            cache = caches.setdefault((checkpoint, draw), {})
            family = kinds[checkpoint][0]
            results = validate(family.objective, argv, statistics_cache=cache, family_name=family.name)
            elapsed = time.perf_counter() - start
            write_json_atomic(done, identity | {"figure": headline.key, "seconds": elapsed, "results": results})
        if results.get("reads_calibration_sample") is False:
            sample_free.add((checkpoint, bits, recipe))
        draws.setdefault((checkpoint, bits, recipe), []).append(
            (_finite_or_nan(results[headline.key]), elapsed, results)
        )
    rows = _rows(draws, kinds, headline)
    seconds = time.perf_counter() - start_all
    columns = {
        Path(c).name: Path(c).name + (f" ({kinds[c][1]})" if kinds[c][1] else "") for c in comparison.checkpoints
    }
    record = {"checkpoints": comparison.checkpoints, "bits": comparison.bits, "recipes": comparison.recipes}
    record |= {"reduced": comparison.reduced, "draws": comparison.draws, "figure": headline.key}
    record |= {"higher_is_better": headline.higher_is_better}
    write_json_atomic(output / "comparison.json", record | {"wall_seconds": seconds, "rows": rows})
    markdown = comparison_table(rows, columns, headline)
    if comparison.draws > 1 and sample_free:
        markdown += (
            "\nA quantized cell without ± is of a recipe that read no calibration sample (dynamic ranges, "
            "round-to-nearest weights): every draw is the same model, so it ran once.\n"
        )
    write_text_atomic(output / "comparison.md", markdown)
    axis = "score gap to FP (points)" if headline.higher_is_better else "perplexity gap to FP (%)"
    write_quantization_comparison(gap_panels(rows, columns, comparison.bits), output / "comparison.png", axis)
    print(markdown)
    print(f"{ran} runs in {seconds / 60:.1f} min; wrote {output / 'comparison.md'}, .json and .png")
    return rows
