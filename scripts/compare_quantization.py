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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers_language.errors import UsageError, run_cli  # noqa: E402
from transformers_language.jobs.compare import DEFAULT_BITS, DEFAULT_DRAWS, Comparison, compare, owned_flags  # noqa: E402
from transformers_language.ptq.recipes import BIT_SETTINGS, PTQ_METHODS  # noqa: E402


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


def main(argv: list[str] | None = None) -> list[dict]:
    args, passed = parse(sys.argv[1:] if argv is None else argv)
    comparison = Comparison(
        checkpoints=args.checkpoints,
        output_dir=Path(args.output_dir),
        bits=args.bits,
        recipes=args.recipes,
        draws=args.draws,
        passed=passed,
        glue_dir=args.glue_dir,
        reduced=args.reduced,
        resume=args.resume,
    )
    return compare(comparison)


if __name__ == "__main__":
    run_cli(main)
