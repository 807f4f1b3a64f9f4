"""W8A8 validation against FP validation of the same checkpoints, in alternating fresh processes.

Builds BERT-small and OPT-small checkpoints as bench_validate.py does and runs `validate_*.py` on all of
WikiText-2 valid.txt (seq 128, batch 32 / 16, fp32, 2 threads), FP and `--quantize` (W8A8, fp32_head,
MSE weight ranges, running min-max activation ranges over 16 calibration batches of test.txt) in turn. It
prints the wall-time ratio, the extra peak RSS and the calibration time (from the run's log).

    python benchmarks/bench_quantize.py [--rounds 2] [--models bert opt] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from bench_validate import _process_run, prepared_checkpoints
from common import DATA, SETUPS

from transformers_language.files import write_json_atomic

W8A8 = ("--quantize", "--ranges_weights", "MSE", "--train_file", str(DATA / "test.txt"))
CALIBRATION = re.compile(r"Calibrated \d+ activation quantizers on \d+ \w+ blocks in ([0-9.]+) s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="FP / W8A8 pairs per model.")
    parser.add_argument("--models", nargs="+", default=["bert", "opt"], choices=list(SETUPS))
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    figures = {}
    for model, checkpoint, cache in prepared_checkpoints(args.models, W8A8):  # tokenizes both splits
        runs = {"fp": [], "w8a8": []}
        for _ in range(args.rounds):
            for kind, extra in (("fp", ()), ("w8a8", W8A8)):
                runs[kind].append(_process_run(model, checkpoint, cache, extra))
                print(f"  {model} {kind}: {runs[kind][-1]['seconds']:.1f} s", file=sys.stderr)
        fp_s = statistics.median(r["seconds"] for r in runs["fp"])
        q_s = statistics.median(r["seconds"] for r in runs["w8a8"])
        calibration = [float(CALIBRATION.search(r["log"]).group(1)) for r in runs["w8a8"]]
        figures[model] = {
            "fp_seconds": fp_s,
            "w8a8_seconds": q_s,
            "wall_ratio": q_s / fp_s,
            "fp_peak_rss_gib": max(r["peak_rss_gib"] for r in runs["fp"]),
            "w8a8_peak_rss_gib": max(r["peak_rss_gib"] for r in runs["w8a8"]),
            "calibration_seconds": statistics.median(calibration),
            "fp_perplexity": runs["fp"][0]["perplexity"],
            "w8a8_perplexity": runs["w8a8"][0]["perplexity"],
        }
        f = figures[model]
        print(
            f"{model}: FP {fp_s:.1f} s, W8A8 {q_s:.1f} s ({f['wall_ratio']:.2f}x); peak RSS "
            f"{f['fp_peak_rss_gib']:.2f} -> {f['w8a8_peak_rss_gib']:.2f} GiB "
            f"(+{f['w8a8_peak_rss_gib'] - f['fp_peak_rss_gib']:.2f}); "
            f"calibration {f['calibration_seconds']:.1f} s; "
            f"perplexity {f['fp_perplexity']:.2f} -> {f['w8a8_perplexity']:.2f}"
        )
    if args.json:
        write_json_atomic(Path(args.json), figures)


if __name__ == "__main__":
    main()
