"""One checkpoint, every post-training method, one table: FP validation, then `--quantize` with each method of
PTQ_METHODS at each bit setting, through validate_mlm / validate_clm (the checkpoint's family), in this
process. Writes `ptq_table.md` and `ptq_table.json` (perplexity, gap to FP, LLM.int8()'s FP-channel share,
seconds) and each run's `all_results.json` under `--output_dir/<bits>/<method>/`.

    python scripts/ptq_table.py --model_name_or_path runs/demo-full/vanilla --output_dir runs/ptq \\
        --bits W8A8 W6A6 -- --train_file ../shared/data/wikitext-2/test.txt \\
        --validation_file ../shared/data/wikitext-2/valid.txt --block_size 128

Everything after `--` goes to every validation run (data, sequence length, batch sizes, calibration flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers_language.errors import UsageError, run_cli  # noqa: E402
from transformers_language.families import get_family  # noqa: E402
from transformers_language.files import write_json_atomic, write_text_atomic  # noqa: E402
from transformers_language.quant_args import BIT_SETTINGS, PTQ_METHODS, QuantizationArgs  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A checkpoint written by run_mlm / run_clm.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W6A6"], choices=list(BIT_SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(PTQ_METHODS), choices=list(PTQ_METHODS))
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def model_type_of(checkpoint: str) -> str:
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise UsageError(
            f"--model_name_or_path {checkpoint}: no config.json; pass a folder written by run_mlm / run_clm."
        )
    return json.loads(config.read_text())["model_type"]


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


def table(rows: list[dict]) -> str:
    lines = [
        "| bits | method | perplexity | gap to FP | LLM.int8() FP channels | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        share = row.get("llm_int8_mean_float_channel_share")
        gap = "" if row["bits"] == "FP" else f"{row['gap']:+.2f} ({row['gap_percent']:+.1f}%)"
        lines.append(
            f"| {row['bits']} | {row['method']} | {row['perplexity']:.2f} | {gap} | "
            f"{'' if share is None else f'{100 * share:.2f}%'} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from transformers_language.validate import validate

    args, passed = parse(sys.argv[1:] if argv is None else argv)
    objective = get_family(model_type_of(args.model_name_or_path)).objective
    output = Path(args.output_dir)
    runs = [("FP", "fp", ())]
    for bits in args.bits:
        n_bits, n_bits_act = BIT_SETTINGS[bits]
        for method in args.methods:
            flags = ("--quantize", "--n_bits", str(n_bits), "--n_bits_act", str(n_bits_act), *PTQ_METHODS[method])
            runs.append((bits, method, flags))
    rows = []
    for bits, method, flags in runs:
        start = time.perf_counter()
        run_argv = ["--model_name_or_path", args.model_name_or_path, "--output_dir", str(output / bits / method)]
        results = validate(objective, [*run_argv, *(passed if flags else float_argv(passed)), *flags])
        row = {"bits": bits, "method": method, "perplexity": results["perplexity"]}
        row["seconds"] = time.perf_counter() - start
        if "llm_int8_mean_float_channel_share" in results:
            row["llm_int8_mean_float_channel_share"] = results["llm_int8_mean_float_channel_share"]
        rows.append(row)
    fp = rows[0]["perplexity"]
    for row in rows:
        row["gap"] = row["perplexity"] - fp
        row["gap_percent"] = 100 * row["gap"] / fp
    write_json_atomic(output / "ptq_table.json", {"checkpoint": args.model_name_or_path, "rows": rows})
    write_text_atomic(output / "ptq_table.md", table(rows))
    print(table(rows))
    return rows


if __name__ == "__main__":
    run_cli(main)
