"""Every post-training fix on one or more checkpoints, side by side: each checkpoint in floating point and under
each recipe of PTQ_METHODS (per-tensor, per-channel weights, PEG, MP-PTQ, per-token, LLM.int8(), OS, SmoothQuant,
OS+) at each bit width, through validate_mlm / validate_clm (the checkpoint's family) in this process. Given the
vanilla, clipped-softmax and gated-attention checkpoints it answers the paper's question in one table: does an
architectural fix beat the post-training ones?

    python scripts/compare_quantization.py runs/demo-full/vanilla runs/demo-full/clipped_softmax \\
        runs/demo-full/gated_attention --output_dir runs/compare -- \\
        --train_file ../shared/data/wikitext-2/test.txt --validation_file ../shared/data/wikitext-2/valid.txt \\
        --block_size 128 --per_device_train_batch_size 32 --per_device_eval_batch_size 16

Everything after `--` goes to every run (data, sequence length, batch sizes, calibration flags; the FP runs drop the
calibration-only ones); the flags the comparison sets itself (the checkpoint, the output folder, `--quantize`, the
bit widths and the recipes' flags) are refused there. Each checkpoint is evaluated in FP once, and the float
calibration statistics of the equivalent transforms (SmoothQuant's and OS+'s per-channel extremes and token sample)
are computed once per checkpoint and shared by every recipe and bit width. `--reduced` is a quick look with the same
recipes and bit widths: 2 calibration batches, the first 10% of the validation text, 5 OS+ thresholds, 3 clipping
quantiles.

Writes to --output_dir: `comparison.md` (rows: bit width and recipe; columns: checkpoints, perplexity and gap to
FP), `comparison.json` (every run: perplexity, gap, seconds, LLM.int8()'s FP-channel share, what OS+ and
token-wise clipping chose), `comparison.png` (the gap per recipe and bit width) and each run's all_results.json
under `<checkpoint>/<bits>/<recipe>/`. Each finished run also writes `compare_run.json`, one atomic file with its
full argv, the checkpoint's identity (every file's size and modification time) and its results. With `--resume`,
a run whose record matches its argv and checkpoint is read back from that record instead of repeated, so a
comparison can grow by a checkpoint or continue after an interruption; a missing, truncated or mismatched record
is redone, never read back.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers_language.errors import UsageError, run_cli  # noqa: E402
from transformers_language.families import get_family  # noqa: E402
from transformers_language.files import write_json_atomic, write_text_atomic  # noqa: E402
from transformers_language.ptq.quant_args import QuantizationArgs  # noqa: E402
from transformers_language.ptq.recipes import BIT_SETTINGS, PTQ_METHODS  # noqa: E402

DEFAULT_BITS = ("W8A8", "W6A6", "W4A8")
RUN_RECORD = "compare_run.json"  # a finished run's argv, checkpoint identity, time and results: one atomic unit
REDUCED = ("--est_num_batches", "2", "--validation_percentage", "10")
# In --reduced mode, what a recipe's own search gets (only where the recipe has that search).
REDUCED_BY_FLAG = {
    "--os_plus": ("--os_plus_grid", "5"),
    "--token_clipping": ("--token_clipping_quantiles", "1.0", "0.999", "0.99"),
}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="Folders written by run_mlm / run_clm (one family).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS), choices=list(BIT_SETTINGS))
    parser.add_argument("--recipes", nargs="+", default=list(PTQ_METHODS), choices=list(PTQ_METHODS))
    parser.add_argument("--reduced", action="store_true", help="A quick look (see above).")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse each run already in --output_dir with exactly these flags (e.g. after adding a checkpoint).",
    )
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
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
    owned = {"--model_name_or_path", "--output_dir", "--quantize", "--n_bits", "--n_bits_act"}
    owned |= {flag for method in PTQ_METHODS.values() for flag in method.flags if flag.startswith("--")}
    if reduced:
        owned |= {flag for flag in REDUCED if flag.startswith("--")}
        owned |= {flag for extra in REDUCED_BY_FLAG.values() for flag in extra if flag.startswith("--")}
    return owned


def read_record(path: Path) -> dict:
    """A finished run's record, or {} when it is missing, truncated or not a record (the run is then redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    results = record.get("results") if isinstance(record, dict) else None
    return record if isinstance(results, dict) and "perplexity" in results else {}


def _finite_or_nan(value) -> float:
    """A figure as read back from strict JSON, where a non-finite number is null."""
    return math.nan if value is None else float(value)


def model_type_of(checkpoint: str) -> str:
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise UsageError(f"{checkpoint}: no config.json; pass folders written by run_mlm / run_clm.")
    return json.loads(config.read_text())["model_type"]


def fingerprint(checkpoint: str) -> dict[str, list[int]]:
    """(size, modification time) of each file of a checkpoint folder: a retrained checkpoint is not resumed."""
    files = sorted(item for item in Path(checkpoint).iterdir() if item.is_file())
    return {item.name: [item.stat().st_size, item.stat().st_mtime_ns] for item in files}


def float_argv(passed: list[str]) -> list[str]:
    """`passed` without what only configures --quantize (the calibration data and the W8A8 flags), which the
    FP run refuses."""
    arity = {"--train_file": 1, "--train_percentage": 1}
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


def recipe_flags(recipe: str, bits: str, reduced: bool) -> list[str]:
    n_bits, n_bits_act = BIT_SETTINGS[bits]
    flags = ["--quantize", "--n_bits", str(n_bits), "--n_bits_act", str(n_bits_act), *PTQ_METHODS[recipe].flags]
    if reduced:
        flags += [*REDUCED[:2], *(extra for flag, more in REDUCED_BY_FLAG.items() if flag in flags for extra in more)]
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


def table(rows: list[dict], checkpoints: list[str]) -> str:
    """Rows: FP, then each bit width and recipe; one column per checkpoint: perplexity (gap to FP)."""
    cells = {(row["bits"], row["recipe"], row["checkpoint"]): row for row in rows}
    order = list(dict.fromkeys((row["bits"], row["recipe"]) for row in rows))
    lines = ["| bits | recipe | " + " | ".join(checkpoints) + " |", "| --- | --- |" + " --- |" * len(checkpoints)]
    for bits, recipe in order:
        values = []
        for checkpoint in checkpoints:
            row = cells.get((bits, recipe, checkpoint))
            if row is None:
                values.append("")
            elif bits == "FP":
                values.append(f"{row['perplexity']:.2f}")
            else:
                values.append(f"{row['perplexity']:.2f} ({row['gap_percent']:+.1f}%)")
        label = "-" if bits == "FP" else PTQ_METHODS[recipe].label
        lines.append(f"| {bits} | {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from transformers_language.evaluation.plots import write_quantization_comparison
    from transformers_language.jobs.validate import validate

    args, passed = parse(sys.argv[1:] if argv is None else argv)
    objectives = {checkpoint: get_family(model_type_of(checkpoint)).objective for checkpoint in args.checkpoints}
    if len(set(objectives.values())) > 1:
        raise UsageError(
            "Compare checkpoints of one model family (their perplexities are of different tasks): "
            + ", ".join(f"{c} ({objective})" for c, objective in objectives.items())
        )
    output = Path(args.output_dir)
    shared = [*passed, *(REDUCED[2:] if args.reduced else ())]
    runs = [(checkpoint, "FP", "fp") for checkpoint in args.checkpoints]
    runs += [(c, bits, recipe) for c in args.checkpoints for bits in args.bits for recipe in args.recipes]
    rows, caches, fp = [], {c: {} for c in args.checkpoints}, {}
    fingerprints = {c: fingerprint(c) for c in args.checkpoints}
    start_all = time.perf_counter()
    for checkpoint, bits, recipe in tqdm(runs, desc="Runs", unit="run"):
        name = Path(checkpoint).name
        start = time.perf_counter()
        argv_run = ["--model_name_or_path", checkpoint, "--output_dir", str(output / name / bits / recipe)]
        if bits == "FP":
            argv_run += float_argv(shared)
        else:
            argv_run += [*shared, *recipe_flags(recipe, bits, args.reduced)]
        run_dir = output / name / bits / recipe
        done = run_dir / RUN_RECORD
        identity = {"argv": argv_run, "checkpoint_files": fingerprints[checkpoint]}
        previous = read_record(done) if args.resume else {}
        if previous and {key: previous.get(key) for key in identity} == json.loads(json.dumps(identity)):
            results, elapsed = previous["results"], previous.get("seconds", math.nan)
        else:
            done.unlink(missing_ok=True)  # the run's folder is being rewritten: no stale record may pair with it
            results = validate(objectives[checkpoint], argv_run, statistics_cache=caches[checkpoint])
            elapsed = time.perf_counter() - start
            write_json_atomic(done, identity | {"seconds": elapsed, "results": results})
        perplexity = _finite_or_nan(results["perplexity"])
        fp.setdefault(checkpoint, perplexity)
        gap = perplexity - fp[checkpoint]
        rows.append(
            {
                "checkpoint": name,
                "path": checkpoint,
                "bits": bits,
                "recipe": recipe,
                "perplexity": perplexity,
                "gap": gap,
                "gap_percent": 100 * gap / fp[checkpoint],
                "seconds": elapsed,
                **_choices(results),
            }
        )
    seconds = time.perf_counter() - start_all
    names = [Path(c).name for c in args.checkpoints]
    gaps = {bits: {} for bits in args.bits}
    for row in rows:
        if row["bits"] != "FP":
            gaps[row["bits"]].setdefault(PTQ_METHODS[row["recipe"]].label, {})[row["checkpoint"]] = row["gap_percent"]
    record = {"checkpoints": args.checkpoints, "bits": args.bits, "recipes": args.recipes, "reduced": args.reduced}
    write_json_atomic(output / "comparison.json", record | {"wall_seconds": seconds, "rows": rows})
    markdown = table(rows, names)
    write_text_atomic(output / "comparison.md", markdown)
    write_quantization_comparison(gaps, output / "comparison.png")
    print(markdown)
    print(f"{len(runs)} runs in {seconds / 60:.1f} min; wrote {output / 'comparison.md'}, .json and .png")
    return rows


if __name__ == "__main__":
    run_cli(main)
