"""Training throughput and peak memory of run_mlm / run_clm against a stock-HF training loop.

Trains BERT-small (4 layers, hidden 256, 4 heads, FFN 1024; seq 128, batch 32, BERT WordPiece) and
OPT-small (same sizes, 8k BPE; block 128, batch 16) on WikiText-2 test.txt in fp32 with 2 CPU threads,
and prints the median seconds per step over steps 11..N, tokens/s and peak RSS. Each run is a fresh
process (so peak RSS is its own), runs alternate between ours and the baseline, and the tokenized data is
cached before any run is timed. The baseline is the loop of the paper's scripts (the HF example): the
stock HF model with eager attention, `DataCollatorForLanguageModeling` / default collation, full-vocabulary
logits and `model(**batch).loss`. The paper's own figures on this machine class are printed beside.

Precision: our training at the demo's batch (32) in fp32 eager, `--mixed_precision bf16`, and bf16 with
`--torch_compile`, alternating within one process (each mode once per round, so drift hits all alike); the
ratio of median tokens/s to fp32 eager (compile time excluded: steps 1..10 are dropped), and each mode's peak
RSS from a run in its own process (and peak GPU memory where a CUDA device runs the training).

    python benchmarks/bench_train.py [--steps 60] [--rounds 1] [--models bert opt] [--json out.json]
    python benchmarks/bench_train.py --precision [--steps 40] [--rounds 2]   # the precision rows only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import CHILD_ENV, REPO, SEQ_LENGTH, SETUPS, stock_step_seconds, train_argv

from transformers_language.files import write_json_atomic

# The paper's code on this machine class (from the issue): s/step, tokens/s and peak RSS (GiB) ranges.
PAPER = {
    "bert": {"s_per_step": (3.5, 3.9), "rss_gib": (3.4, 3.6)},
    "opt": {"s_per_step": (0.77, 0.82), "rss_gib": (1.2, 1.5)},
}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_ours(model: str, steps: int, output_dir: str, cache: str) -> dict:
    sys.path.insert(0, str(REPO))
    import run_clm
    import run_mlm

    (run_mlm if model == "bert" else run_clm).main(train_argv(model, steps, output_dir, cache))
    log = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    tokens = SETUPS[model]["batch"] * SEQ_LENGTH
    return {"step_seconds": [tokens / record["tokens_per_s"] for record in log], "peak_rss_gib": _peak_rss_gib()}


def child_baseline(model: str, steps: int, output_dir: str, cache: str) -> dict:
    """The HF-example training loop of the paper's scripts, on the same cached blocks."""
    import torch
    import yaml
    from accelerate import Accelerator
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        OPTForCausalLM,
        default_data_collator,
    )

    sys.path.insert(0, str(REPO))
    from transformers_language.data.text import prepare_splits
    from transformers_language.jobs.pretrain import build_parser
    from transformers_language.objectives import get_objective

    flags = build_parser(get_objective(SETUPS[model]["script"])).parse(train_argv(model, steps, output_dir, cache))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(flags.model.tokenizer_name)
    blocks = prepare_splits(flags.data, ("train",), tokenizer, SEQ_LENGTH, Accelerator(cpu=True))["train"]
    blocks = blocks.with_format(None)
    config = AutoConfig.for_model(model, **yaml.safe_load(Path(flags.model.config_path).read_text()))
    config.vocab_size = len(tokenizer)
    config._attn_implementation = "eager"
    if model == "bert":
        net = BertForMaskedLM(config)
        collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    else:
        config.pad_token_id, config.bos_token_id, config.eos_token_id = 1, 2, 2
        net = OPTForCausalLM(config)

        def collate(examples):
            batch = default_data_collator(examples)
            batch["labels"] = batch["input_ids"].clone()
            return batch

    loader = torch.utils.data.DataLoader(blocks, batch_size=SETUPS[model]["batch"], shuffle=True, collate_fn=collate)
    seconds = stock_step_seconds(net, loader, 1e-4, steps)
    return {"step_seconds": seconds, "peak_rss_gib": _peak_rss_gib()}


PRECISION_MODES = {
    "fp32": [],
    "bf16": ["--mixed_precision", "bf16"],
    "bf16+compile": ["--mixed_precision", "bf16", "--torch_compile"],
}
PRECISION_BATCH = 32  # the demo's


def _precision_argv(model: str, mode: str, steps: int, output_dir: str, cache: str) -> list[str]:
    batch = ["--per_device_train_batch_size", str(PRECISION_BATCH)]  # the last occurrence wins
    return [*train_argv(model, steps, output_dir, cache), *PRECISION_MODES[mode], *batch]


def child_modes(model: str, steps: int, rounds: int, cache: str) -> dict:
    """Every precision mode once per round, in this process: each mode's per-step seconds (steps 11..N)."""
    sys.path.insert(0, str(REPO))
    from transformers_language.jobs.pretrain import pretrain

    seconds = {mode: [] for mode in PRECISION_MODES}
    tokens = PRECISION_BATCH * SEQ_LENGTH
    for _ in range(rounds):
        for mode in PRECISION_MODES:
            with tempfile.TemporaryDirectory() as output_dir:
                pretrain(SETUPS[model]["script"], _precision_argv(model, mode, steps, output_dir, cache))
                log = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
                seconds[mode] += [tokens / json.loads(line)["tokens_per_s"] for line in log[10:]]
    return {"step_seconds": seconds}


def child_mode_rss(model: str, mode: str, steps: int, output_dir: str, cache: str) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from transformers_language.jobs.pretrain import pretrain

    pretrain(SETUPS[model]["script"], _precision_argv(model, mode, steps, output_dir, cache))
    gpu = {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
    return {"peak_rss_gib": _peak_rss_gib(), **gpu}


def precision_rows(model: str, steps: int, rounds: int, cache: str) -> dict:
    timed = _run_child("modes", model, steps, cache, ["--rounds", str(rounds)])["step_seconds"]
    tokens = PRECISION_BATCH * SEQ_LENGTH
    fp32 = statistics.median(timed["fp32"])
    rows = {}
    for mode, seconds in timed.items():
        memory = _run_child("mode_rss", model, 20, cache, ["--mode", mode])  # RSS, and GPU memory on CUDA
        median = statistics.median(seconds)
        rows[mode] = {"median_s_per_step": median, "tokens_per_s": tokens / median, "vs_fp32": fp32 / median}
        rows[mode] |= memory
    return rows


def _run_child(kind: str, model: str, steps: int, cache: str, extra: tuple = ()) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, __file__, "--child", kind, "--models", model, "--steps", str(steps)]
        command += ["--cache", cache, "--output_dir", output_dir, *extra]
        done = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} {model} failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1, help="Alternating ours/baseline pairs per model.")
    parser.add_argument("--models", nargs="+", default=["bert", "opt"], choices=list(SETUPS))
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--precision", action="store_true", help="Only the precision rows (fp32, bf16, compile).")
    children = ["ours", "baseline", "modes", "mode_rss"]
    parser.add_argument("--child", default=None, choices=children, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, choices=list(PRECISION_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model = args.models[0]
        if args.child == "modes":
            result = child_modes(model, args.steps, args.rounds, args.cache)
        elif args.child == "mode_rss":
            result = child_mode_rss(model, args.mode, args.steps, args.output_dir, args.cache)
        else:
            runner = child_ours if args.child == "ours" else child_baseline
            result = runner(model, args.steps, args.output_dir, args.cache)
        print(json.dumps(result))
        return

    figures = {}
    with tempfile.TemporaryDirectory() as cache:
        for model in args.models:
            _run_child("ours", model, 1, cache)  # tokenizes and caches the data; not timed
            if not args.precision:
                runs = {"ours": [], "baseline": []}
                for _ in range(args.rounds):
                    for kind in ("ours", "baseline"):
                        runs[kind].append(_run_child(kind, model, args.steps, cache))
                        print(f"  {model} {kind}: done", file=sys.stderr)
                figures[model] = _summarise(model, runs)
            figures.setdefault(model, {})["precision"] = precision_rows(model, args.steps, args.rounds, cache)
            print(f"  {model} precision: done", file=sys.stderr)
    _report(figures)
    if args.json:
        write_json_atomic(Path(args.json), figures)


def _summarise(model: str, runs: dict) -> dict:
    tokens = SETUPS[model]["batch"] * SEQ_LENGTH
    result = {}
    for kind, kind_runs in runs.items():
        timed = [s for run in kind_runs for s in run["step_seconds"][10:]]
        median = statistics.median(timed)
        result[kind] = {
            "median_s_per_step": median,
            "tokens_per_s": tokens / median,
            "peak_rss_gib": max(run["peak_rss_gib"] for run in kind_runs),
        }
    paper = PAPER[model]
    result["speedup_vs_baseline"] = result["baseline"]["median_s_per_step"] / result["ours"]["median_s_per_step"]
    result["rss_vs_baseline"] = result["ours"]["peak_rss_gib"] / result["baseline"]["peak_rss_gib"]
    result["speedup_vs_paper"] = [lo / result["ours"]["median_s_per_step"] for lo in paper["s_per_step"]]
    result["rss_vs_paper"] = [result["ours"]["peak_rss_gib"] / gib for gib in paper["rss_gib"]]
    return result


def _report(figures: dict) -> None:
    print(f"{'model':6} {'run':12} {'s/step':>7} {'tokens/s':>9} {'peak RSS GiB':>13} {'x fp32':>7} {'GPU GiB':>8}")
    for model, result in figures.items():
        for mode, row in result["precision"].items():
            figures_text = f"{row['median_s_per_step']:7.3f} {row['tokens_per_s']:9.0f} {row['peak_rss_gib']:13.2f}"
            gpu = f" {row['peak_gpu_gib']:8.2f}" if "peak_gpu_gib" in row else ""
            print(f"{model:6} {mode:12} {figures_text} {row['vs_fp32']:7.2f}{gpu}")
        if "ours" not in result:
            continue
        for kind in ("ours", "baseline"):
            row = result[kind]
            figures_text = f"{row['median_s_per_step']:7.3f} {row['tokens_per_s']:9.0f} {row['peak_rss_gib']:13.2f}"
            print(f"{model:6} {kind:12} {figures_text}")
        paper = PAPER[model]
        print(
            f"{model:6} paper     {paper['s_per_step'][0]:.2f}-{paper['s_per_step'][1]:.2f} s/step, "
            f"{paper['rss_gib'][0]}-{paper['rss_gib'][1]} GiB"
        )
        print(
            f"{model:6} ours vs baseline: {result['speedup_vs_baseline']:.2f}x speed, "
            f"{result['rss_vs_baseline']:.2f}x RSS; "
            f"vs paper: {min(result['speedup_vs_paper']):.2f}-{max(result['speedup_vs_paper']):.2f}x speed, "
            f"{min(result['rss_vs_paper']):.2f}-{max(result['rss_vs_paper']):.2f}x RSS"
        )


if __name__ == "__main__":
    main()
