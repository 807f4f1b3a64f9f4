"""W8A8 validation with each post-training method against FP validation of the same checkpoints, in
alternating fresh processes.

Builds BERT-small and OPT-small checkpoints as bench_validate.py does and runs `validate_*.py` on all of
WikiText-2 valid.txt (seq 128, batch 32 / 16, fp32, 2 threads): FP, and `--quantize` (W8A8, fp32_head, MSE
weight ranges, running min-max activation ranges over 16 calibration batches of test.txt) with each method:
per-tensor (the paper's), per-channel weights, PEG (K = 6, permuted), MP-PTQ, per-token activations (with
per-channel weights), LLM.int8(), OS, SmoothQuant, OS+, RTN, GPTQ, QuaRot (OPT), QuaRot+GPTQ (OPT) and FP8.
It prints each method's wall-time ratio to FP (targets: per-channel and PEG within 1.3x, per-token and
LLM.int8() within 2x), the extra peak RSS, the calibration time (from the run's log) and QuaRot's time over
RTN's (the rotation's overhead in validation: the online Hadamard transforms).

    python benchmarks/bench_quantize.py [--rounds 2] [--models bert opt] [--methods per_tensor peg] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from bench_validate import _process_run, prepared_checkpoints
from common import DATA, SETUPS

from transformers_language.families import FAMILIES
from transformers_language.files import write_json_atomic
from transformers_language.ptq.recipes import BIT_SETTINGS
from transformers_language.ptq.recipes import PTQ_METHODS as METHODS

CALIBRATION = ("--train_file", str(DATA / "test.txt"))
MSE_WEIGHTS = ("--ranges_weights", "MSE")
W8A8 = ("--quantize", *MSE_WEIGHTS, *CALIBRATION)
TARGETS = {"per_channel": 1.3, "peg": 1.3, "per_token": 2.0, "llm_int8": 2.0}  # the rest: none


def method_flags(kind: str) -> tuple[str, ...]:
    """The recipe's W8A8 flags; MSE weight ranges on the integer grid (a number format scales by the maximum)."""
    method = METHODS[kind]
    ranges = MSE_WEIGHTS if method.number_format is None else ()
    return (*method.validate_flags(BIT_SETTINGS["W8A8"]), *ranges, *CALIBRATION)


def runs_on(kind: str, model: str) -> bool:
    """Whether the recipe runs at W8A8 on the family (QuaRot needs a pre-norm family; MXFP4 is 4-bit)."""
    method = METHODS[kind]
    rotation = "--quarot" not in method.flags or FAMILIES[model].wiring.rotation is not None
    return method.fits(BIT_SETTINGS["W8A8"]) and rotation


CALIBRATION = re.compile(r"Calibrated \d+ activation quantizers on \d+ calibration blocks in ([0-9.]+) s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of FP and every method per model.")
    parser.add_argument("--models", nargs="+", default=["bert", "opt"], choices=list(SETUPS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    figures = {}
    for model, checkpoint, cache in prepared_checkpoints(args.models, W8A8):  # tokenizes both splits
        methods = [kind for kind in args.methods if runs_on(kind, model)]
        runs = {kind: [] for kind in ("fp", *methods)}
        for _ in range(args.rounds):
            for kind in runs:
                extra = () if kind == "fp" else method_flags(kind)
                runs[kind].append(_process_run(model, checkpoint, cache, extra))
                print(f"  {model} {kind}: {runs[kind][-1]['seconds']:.1f} s", file=sys.stderr)
        fp_s = statistics.median(r["seconds"] for r in runs["fp"])
        fp_rss = max(r["peak_rss_gib"] for r in runs["fp"])
        figures[model] = {"fp_seconds": fp_s, "fp_peak_rss_gib": fp_rss, "fp_perplexity": runs["fp"][0]["perplexity"]}
        print(f"{model}: FP {fp_s:.1f} s, peak RSS {fp_rss:.2f} GiB, perplexity {runs['fp'][0]['perplexity']:.2f}")
        for kind in methods:
            seconds = statistics.median(r["seconds"] for r in runs[kind])
            calibration = [float(match.group(1)) for r in runs[kind] if (match := CALIBRATION.search(r["log"]))]
            f = figures[model][kind] = {
                "seconds": seconds,
                "wall_ratio": seconds / fp_s,
                "target_ratio": TARGETS.get(kind),
                "peak_rss_gib": max(r["peak_rss_gib"] for r in runs[kind]),
                "calibration_seconds": statistics.median(calibration) if calibration else 0.0,
                "perplexity": runs[kind][0]["perplexity"],
            }
            target = "" if kind not in TARGETS else f" (target {TARGETS[kind]}x)"
            print(
                f"  {kind}: {seconds:.1f} s, {f['wall_ratio']:.2f}x FP{target}; peak RSS +"
                f"{f['peak_rss_gib'] - fp_rss:.2f} GiB; calibration {f['calibration_seconds']:.1f} s; "
                f"perplexity {f['perplexity']:.2f}"
            )
        if "quarot" in figures[model] and "rtn" in figures[model]:  # the online Hadamards' cost
            overhead = figures[model]["quarot"]["seconds"] / figures[model]["rtn"]["seconds"]
            figures[model]["rotation_overhead"] = overhead
            print(f"  QuaRot over RTN (the online Hadamards and the gate inputs turned back): {overhead:.2f}x")
    if args.json:
        write_json_atomic(Path(args.json), figures)


if __name__ == "__main__":
    main()
