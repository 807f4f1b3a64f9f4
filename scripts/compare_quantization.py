"""Every post-training fix on one or more checkpoints, side by side: each checkpoint in floating point and under
each recipe of PTQ_METHODS (per-tensor, per-channel weights, PEG, MP-PTQ, per-token, LLM.int8(), OS, SmoothQuant,
OS+, RTN, GPTQ, QuaRot, QuaRot+GPTQ, FP8, MXFP4) at each bit setting (W8A8, W6A8, W6A6, W4A8, W4A4KV4, W4A16),
through the validation script of the checkpoint's family (validate_mlm / validate_clm / validate_llama /
validate_vit / validate_glue) in this process. A recipe a family cannot take (OS+ on Llama, QuaRot on BERT) or a
number format at a setting of other bits is left out of the table. Given the vanilla, clipped-softmax and
gated-attention checkpoints it answers the paper's question in one table: does an architectural fix beat the
post-training ones?

    python scripts/compare_quantization.py runs/demo-full/vanilla runs/demo-full/clipped_softmax \\
        runs/demo-full/gated_attention --output_dir runs/compare -- \\
        --train_file ../shared/data/wikitext-2/test.txt --validation_file ../shared/data/wikitext-2/valid.txt \\
        --block_size 128 --per_device_train_batch_size 32 --per_device_eval_batch_size 16

    python scripts/compare_quantization.py runs/glue/minilm-rte runs/glue/minilm-mrpc --glue_dir ../shared/data/glue \\
        --output_dir runs/compare-glue -- --per_device_train_batch_size 32 --per_device_eval_batch_size 32

Each cell is the family's headline figure: perplexity, with its gap to FP in % (positive: worse), or a score (GLUE
task score, top-1 accuracy) in points, with its gap in points (negative: worse). GLUE checkpoints of different
tasks sit side by side, each evaluated on its own task (from its config.json; with `--glue_dir`, from that folder's
GLUE files). Every quantized cell is calibrated on `--draws` samples of calibration batches (`--calibration_seed`
0..N-1; default 3) and shows their mean ± sample standard deviation: on a model with outliers the quantized model
is chaotic, and one draw cannot rank recipes closer than the spread. A recipe whose first draw read nothing of its
calibration sample (dynamic ranges on round-to-nearest weights: per-token, LLM.int8(), RTN, MXFP4) runs once, as
every draw would be the same model, and its cell has no ±.

Everything after `--` goes to every run (data, sequence length, batch sizes, calibration flags; the FP runs drop the
calibration-only ones); the flags the comparison sets itself (the checkpoint, the output folder, the task, `--quantize`,
the bit widths, the calibration seed and the recipes' flags) are refused there. Each checkpoint is evaluated in FP
once, and the float calibration statistics of the equivalent transforms (SmoothQuant's and OS+'s per-channel
extremes and token sample) are computed once per checkpoint and draw and shared by every recipe and bit width.
`--reduced` is a quick look with the same recipes and bit widths: 2 calibration batches, the first 10% of the
validation text (GLUE: 200 examples), 5 OS+ thresholds, 3 clipping quantiles.

Writes to --output_dir: `comparison.md` (rows: bit width and recipe; columns: checkpoints), `comparison.json`
(every cell: mean, spread, each draw's figure, gap, seconds, LLM.int8()'s FP-channel share, what OS+ and token-wise
clipping chose), `comparison.png` (the gap per recipe and bit width, whiskers over the draws) and each run's
all_results.json under `<checkpoint>/FP/fp/` and `<checkpoint>/<bits>/<recipe>/draw_<k>/`. Each finished run also
writes `compare_run.json`, one atomic file with its full argv, the checkpoint's identity (every file's size and
modification time) and its results. With `--resume`, a run whose record matches its argv and checkpoint is read
back from that record instead of repeated, so a comparison can grow by a checkpoint or continue after an
interruption; a missing, truncated or mismatched record is redone, never read back.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoConfig  # noqa: E402

from transformers_language.errors import UsageError, run_cli  # noqa: E402
from transformers_language.families import Family  # noqa: E402
from transformers_language.files import write_json_atomic, write_text_atomic  # noqa: E402
from transformers_language.glue_tasks import GLUE_TASKS, TASK_KEY  # noqa: E402
from transformers_language.models.model_classes import family_of_config  # noqa: E402
from transformers_language.objectives import get_objective  # noqa: E402
from transformers_language.ptq.quant_args import QuantizationArgs  # noqa: E402
from transformers_language.ptq.recipes import BIT_SETTINGS, PTQ_METHODS  # noqa: E402

DEFAULT_BITS = ("W8A8", "W6A6", "W4A8")
DEFAULT_DRAWS = 3  # calibration samples per cell: on a model with outliers one draw cannot rank close recipes
RUN_RECORD = "compare_run.json"  # a finished run's argv, checkpoint identity, time and results: one atomic unit
REDUCED = ("--est_num_batches", "2")
# In --reduced mode, the share of the evaluation data each kind of checkpoint reads (by objective).
REDUCED_DATA = {
    "mlm": ("--validation_percentage", "10"),
    "clm": ("--validation_percentage", "10"),
    "glue": ("--max_eval_samples", "200"),
}
# In --reduced mode, what a recipe's own search gets (only where the recipe has that search).
REDUCED_BY_FLAG = {
    "--os_plus": ("--os_plus_grid", "5"),
    "--token_clipping": ("--token_clipping_quantiles", "1.0", "0.999", "0.99"),
}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoints", nargs="+", help="Folders written by run_mlm / run_clm / run_vit / run_glue (one kind)."
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS), choices=list(BIT_SETTINGS))
    parser.add_argument("--recipes", nargs="+", default=list(PTQ_METHODS), choices=list(PTQ_METHODS))
    parser.add_argument(
        "--draws",
        type=int,
        default=DEFAULT_DRAWS,
        help="Calibration samples per recipe (--calibration_seed 0..N-1): each cell shows their mean and spread.",
    )
    parser.add_argument(
        "--glue_dir",
        help="GLUE checkpoints: the folder of the tasks' GLUE folders (e.g. ../shared/data/glue); each checkpoint "
        "reads its own task's (default: the hub's nyu-mll/glue).",
    )
    parser.add_argument("--reduced", action="store_true", help="A quick look (see above).")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse each run already in --output_dir with exactly these flags (e.g. after adding a checkpoint).",
    )
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    if args.draws < 1:
        raise UsageError(f"--draws must be at least 1, got {args.draws}.")
    names = [Path(c).name for c in args.checkpoints]
    if len(set(names)) != len(names):
        raise UsageError(f"The checkpoints' folder names label the columns and must differ: {', '.join(names)}.")
    passed = argv[split + 1 :]
    refused = owned_flags(args.reduced)
    owned = [flag for flag in passed if flag.split("=")[0] in refused]
    if owned:
        raise UsageError(
            f"{', '.join(dict.fromkeys(owned))} after -- would override what the comparison sets for each run; name "
            "checkpoints before --, --output_dir before --, and choose recipes and bit widths with --recipes / --bits."
        )
    return args, passed


def owned_flags(reduced: bool) -> set[str]:
    """The validate_*.py flags each run gets from the comparison itself, which `--` may not repeat."""
    owned = {"--model_name_or_path", "--output_dir", "--quantize", "--n_bits", "--n_bits_act", "--calibration_seed"}
    owned |= {"--n_bits_kv", "--no_act_quant", "--task_name", "--data_dir"}  # bit settings; a GLUE checkpoint's task
    owned |= {
        flag for method in PTQ_METHODS.values() for flag in (*method.flags, *method.act_flags) if flag.startswith("--")
    }
    if reduced:
        owned |= {flag for flag in (*REDUCED, *(f for data in REDUCED_DATA.values() for f in data)) if flag[:2] == "--"}
        owned |= {flag for extra in REDUCED_BY_FLAG.values() for flag in extra if flag.startswith("--")}
    return owned


def read_record(path: Path) -> dict:
    """A finished run's record, or {} when it is missing, truncated or not a record (the run is then redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    results = record.get("results") if isinstance(record, dict) else None
    figure = record.get("figure") if isinstance(record, dict) else None
    return record if isinstance(results, dict) and figure in results else {}


def _finite_or_nan(value) -> float:
    """A figure as read back from strict JSON, where a non-finite number is null."""
    return math.nan if value is None else float(value)


def checkpoint_kind(checkpoint: str) -> tuple[Family, str | None]:
    """The family of a saved model and, for a GLUE model, its task."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise UsageError(f"{checkpoint}: no config.json; pass folders written by run_mlm / run_clm / run_glue.")
    config = AutoConfig.from_pretrained(checkpoint)
    return family_of_config(config), getattr(config, TASK_KEY, None)


def fingerprint(checkpoint: str) -> dict[str, list[int]]:
    """(size, modification time) of each file of a checkpoint folder: a retrained checkpoint is not resumed."""
    files = sorted(item for item in Path(checkpoint).iterdir() if item.is_file())
    return {item.name: [item.stat().st_size, item.stat().st_mtime_ns] for item in files}


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
    flags = [*PTQ_METHODS[recipe].validate_flags(BIT_SETTINGS[bits]), "--calibration_seed", str(draw)]
    if reduced:
        flags += [*REDUCED, *(extra for flag, more in REDUCED_BY_FLAG.items() if flag in flags for extra in more)]
    return flags


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


@dataclass(frozen=True)
class Headline:
    """The figure a comparison reads (the objective's headline) and how its gap is shown."""

    key: str
    higher_is_better: bool

    def cell(self, value: float, spread: float | None = None) -> str:
        """A perplexity as is; an accuracy or GLUE score in points (x 100)."""
        scale, digits = (100.0, 1) if self.higher_is_better else (1.0, 2)
        text = f"{value * scale:.{digits}f}"
        return text if spread is None else f"{text} ± {spread * scale:.{digits}f}"

    def gap(self, value: float, fp: float) -> tuple[float, str]:
        """(gap, its text): points lost (negative: worse) for a score, % of perplexity gained (positive: worse)."""
        if self.higher_is_better:
            gap = 100.0 * (value - fp)
            return gap, f"{gap:+.1f}"
        gap = 100.0 * (value - fp) / fp
        return gap, f"{gap:+.1f}%"


def _mean_and_spread(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table(rows: list[dict], columns: dict[str, str], headline: Headline) -> str:
    """Rows: FP, then each bit width and recipe; one column per checkpoint: the figure's mean over the draws,
    ± their spread, and the gap to FP."""
    cells = {(row["bits"], row["recipe"], row["checkpoint"]): row for row in rows}
    order = list(dict.fromkeys((row["bits"], row["recipe"]) for row in rows))
    lines = ["| bits | recipe | " + " | ".join(columns.values()) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for bits, recipe in order:
        values = []
        for checkpoint in columns:
            row = cells.get((bits, recipe, checkpoint))
            if row is None:
                values.append("n/a")  # a recipe the checkpoint's family cannot take (OS+ on Llama)
            elif bits == "FP":
                values.append(headline.cell(row["value"]))
            else:
                values.append(f"{headline.cell(row['value'], row['spread'])} ({row['gap_text']})")
        label = "-" if bits == "FP" else PTQ_METHODS[recipe].label
        lines.append(f"| {bits} | {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from transformers_language.evaluation.plots import write_quantization_comparison
    from transformers_language.jobs.validate import validate

    args, passed = parse(sys.argv[1:] if argv is None else argv)
    kinds = {checkpoint: checkpoint_kind(checkpoint) for checkpoint in args.checkpoints}
    objectives = {checkpoint: family.objective for checkpoint, (family, _) in kinds.items()}
    if len(set(objectives.values())) > 1:
        raise UsageError(
            "Compare checkpoints of one objective (OPT and Llama may share a table; other figures are of different "
            "tasks): " + ", ".join(f"{c} ({objective})" for c, objective in objectives.items())
        )
    objective = get_objective(next(iter(objectives.values())))
    headline = Headline(objective.reported[0][0], objective.higher_is_better)
    output = Path(args.output_dir)
    shared = [*passed, *(REDUCED_DATA.get(objective.name, ()) if args.reduced else ())]
    runs = [(checkpoint, "FP", "fp", 0) for checkpoint in args.checkpoints]
    runs += [
        (c, bits, recipe, draw)
        for c in args.checkpoints
        for bits in args.bits
        for recipe in args.recipes
        for draw in range(args.draws)
        if applies(recipe, kinds[c][0], bits)
    ]
    for checkpoint in args.checkpoints:
        skipped = [recipe for recipe in args.recipes if not applies(recipe, kinds[checkpoint][0])]
        if skipped:
            print(f"{checkpoint}: {', '.join(skipped)} not run (the family cannot take them: n/a).")
    for bits in args.bits:
        unfit = [recipe for recipe in args.recipes if not PTQ_METHODS[recipe].fits(BIT_SETTINGS[bits])]
        if unfit:
            print(f"{bits}: {', '.join(unfit)} not run (a number format of other bits, or FP activations: n/a).")
    draws, caches, sample_free = {}, {}, set()
    fingerprints = {c: fingerprint(c) for c in args.checkpoints}
    start_all = time.perf_counter()
    ran = 0
    for checkpoint, bits, recipe, draw in tqdm(runs, desc="Runs", unit="run"):
        if draw and (checkpoint, bits, recipe) in sample_free:
            continue  # its first draw read no calibration sample: every other draw is that run again
        ran += 1
        name = Path(checkpoint).name
        start = time.perf_counter()
        run_dir = output / name / bits / recipe / (f"draw_{draw}" if bits != "FP" else "")
        argv_run = [
            "--model_name_or_path",
            checkpoint,
            "--output_dir",
            str(run_dir),
            *task_flags(kinds[checkpoint], args.glue_dir),
        ]
        if bits == "FP":
            argv_run += float_argv(shared)
        else:
            argv_run += [*shared, *recipe_flags(recipe, bits, args.reduced, draw)]
        done = run_dir / RUN_RECORD
        identity = {"argv": argv_run, "checkpoint_files": fingerprints[checkpoint]}
        previous = read_record(done) if args.resume else {}
        if previous and {key: previous.get(key) for key in identity} == json.loads(json.dumps(identity)):
            results, elapsed = previous["results"], previous.get("seconds", math.nan)
        else:
            done.unlink(missing_ok=True)  # the run's folder is being rewritten: no stale record may pair with it
            # The transforms' float statistics depend on the calibration sample: one cache per checkpoint and draw.
            cache = caches.setdefault((checkpoint, draw), {})
            family = kinds[checkpoint][0]
            results = validate(family.objective, argv_run, statistics_cache=cache, family_name=family.name)
            elapsed = time.perf_counter() - start
            write_json_atomic(done, identity | {"figure": headline.key, "seconds": elapsed, "results": results})
        if results.get("reads_calibration_sample") is False:
            sample_free.add((checkpoint, bits, recipe))
        draws.setdefault((checkpoint, bits, recipe), []).append(
            (_finite_or_nan(results[headline.key]), elapsed, results)
        )
    rows, fp = [], {}
    for (checkpoint, bits, recipe), done_draws in draws.items():
        values = [value for value, _, _ in done_draws]
        value, spread = _mean_and_spread(values)
        fp.setdefault(checkpoint, value)
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
    seconds = time.perf_counter() - start_all
    columns = {Path(c).name: Path(c).name + (f" ({kinds[c][1]})" if kinds[c][1] else "") for c in args.checkpoints}
    gaps = {bits: {} for bits in args.bits}
    for row in rows:
        if row["bits"] != "FP":
            label = PTQ_METHODS[row["recipe"]].label
            gaps[row["bits"]].setdefault(label, {})[columns[row["checkpoint"]]] = (row["gap"], row["draw_gaps"])
    record = {"checkpoints": args.checkpoints, "bits": args.bits, "recipes": args.recipes, "reduced": args.reduced}
    record |= {"draws": args.draws, "figure": headline.key, "higher_is_better": headline.higher_is_better}
    write_json_atomic(output / "comparison.json", record | {"wall_seconds": seconds, "rows": rows})
    markdown = table(rows, columns, headline)
    if args.draws > 1 and sample_free:
        markdown += (
            "\nA quantized cell without ± is of a recipe that read no calibration sample (dynamic ranges, "
            "round-to-nearest weights): every draw is the same model, so it ran once.\n"
        )
    write_text_atomic(output / "comparison.md", markdown)
    axis = "score gap to FP (points)" if headline.higher_is_better else "perplexity gap to FP (%)"
    write_quantization_comparison(gaps, output / "comparison.png", axis)
    print(markdown)
    print(f"{ran} runs in {seconds / 60:.1f} min; wrote {output / 'comparison.md'}, .json and .png")
    return rows


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
    """A GLUE checkpoint's own task, and its folder under --glue_dir."""
    _, task = kind
    if task is None:
        return []
    folder = [] if glue_dir is None else ["--data_dir", str(Path(glue_dir) / GLUE_TASKS[task].folder)]
    return ["--task_name", task, *folder]


if __name__ == "__main__":
    run_cli(main)
