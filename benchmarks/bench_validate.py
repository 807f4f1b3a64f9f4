"""Validation wall time and peak memory of validate_mlm / validate_clm, and what the statistics cost.

Builds BERT-small and OPT-small checkpoints (model_configs/*-small.yaml, one training step with run_mlm /
run_clm: the weights do not change the cost) and validates them on WikiText-2 valid.txt (seq 128, batch
32 / 16, fp32, 2 CPU threads):
  process   `validate_*.py` as a fresh process: wall time from start to exit and peak RSS, against the
            paper's figures for its FP validation on this machine class;
  overhead  in one process, the evaluation loop alone with and without the statistics (activation
            statistics + attention diagnostics, their sync and the report), alternating, after a warm-up:
            the ratio of the medians is what the statistics add to a plain perplexity pass.
  precision `--precision`: the whole validation job (load, evaluate with the statistics, report) in fp32, with
            `--mixed_precision bf16`, and as the W8A8 simulation (`--quantize`: fp32, 16 calibration batches of
            test.txt, MSE weight ranges for OPT), alternating within one process after an untimed round; the
            ratio of median seconds to fp32's, and each mode's peak RSS from a run in its own process.
The tokenized data is cached before anything is timed.

    python benchmarks/bench_validate.py [--rounds 2] [--models bert opt] [--json out.json]
    python benchmarks/bench_validate.py --precision [--rounds 2]   # the precision rows only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CHILD_ENV, DATA, REPO, SEQ_LENGTH, SETUPS, seq_flag, train_argv

from transformers_language.files import write_json_atomic

# The paper's code on this machine class (from the issue): FP validation process wall seconds, peak RSS GiB.
PAPER = {"bert": {"seconds": (102, 123), "rss_gib": (2.8, 2.8)}, "opt": {"seconds": (49, 60), "rss_gib": (1.1, 1.2)}}
# Runs a script in this same process and prints that process's peak RSS (KiB) after it.
RSS_WRAPPER = (
    "import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


PRECISION_MODES = {
    "fp32": [],
    "bf16": ["--mixed_precision", "bf16"],
    "w8a8": ["--quantize", "--train_file", str(DATA / "test.txt")],
}
W8A8_EXTRA = {"bert": [], "opt": ["--ranges_weights", "MSE"]}  # the paper's recipes (validate_*_w8a8.sh)


def validate_argv(model: str, checkpoint: str, output_dir: str, cache: str) -> list[str]:
    return [
        "--model_name_or_path", checkpoint,
        "--validation_file", str(DATA / "valid.txt"),
        seq_flag(model), str(SEQ_LENGTH),
        "--per_device_eval_batch_size", str(SETUPS[model]["batch"]),
        "--data_cache_dir", cache,
        "--output_dir", output_dir,
    ]  # fmt: skip


def _build_checkpoint(model: str, checkpoint: str, cache: str) -> None:
    """One training step with run_mlm / run_clm: the weights do not change the cost of validation."""
    command = [
        sys.executable,
        str(REPO / f"run_{SETUPS[model]['script']}.py"),
        *train_argv(model, 1, checkpoint, cache),
    ]
    subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, check=True)


def _process_run(model: str, checkpoint: str, cache: str, extra: tuple[str, ...] = ()) -> dict:
    """validate_*.py (with `extra` flags) in a fresh process: wall seconds, its peak RSS and its log."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-c", RSS_WRAPPER, str(REPO / f"validate_{SETUPS[model]['script']}.py")]
        command += [*validate_argv(model, checkpoint, output_dir, cache), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"validate {model} failed:\n{done.stderr[-4000:]}")
        results = json.loads((Path(output_dir) / "all_results.json").read_text())
    rss = int(done.stdout.split("PEAK_RSS_KIB")[-1]) / 2**20
    return {"seconds": seconds, "peak_rss_gib": rss, "perplexity": results["perplexity"], "log": done.stderr}


def prepared_checkpoints(models: list[str], warm_up_flags: tuple[str, ...] = ()):
    """(model, checkpoint, cache) per model: the checkpoint built and the data tokenized by one untimed run."""
    with tempfile.TemporaryDirectory() as root:
        cache = str(Path(root) / "cache")
        for model in models:
            checkpoint = str(Path(root) / model)
            _build_checkpoint(model, checkpoint, cache)
            _process_run(model, checkpoint, cache, warm_up_flags)
            yield model, checkpoint, cache


def child_overhead(model: str, checkpoint: str, cache: str, rounds: int) -> dict:
    """Evaluation loop without and with the statistics, alternating in this process."""
    sys.path.insert(0, str(REPO))
    from accelerate import Accelerator

    from transformers_language.data.modalities import probe_inputs
    from transformers_language.data.text import prepare_splits
    from transformers_language.evaluation.attention_stats import AttentionStatistics
    from transformers_language.evaluation.loop import evaluate
    from transformers_language.evaluation.metrics import ActivationStatistics
    from transformers_language.evaluation.outlier_report import outlier_results
    from transformers_language.families import family_of_objective
    from transformers_language.jobs.plan import resolve_validation
    from transformers_language.jobs.validate import build_parser
    from transformers_language.models.loading import load_checkpoint
    from transformers_language.objectives import get_objective

    objective = get_objective(SETUPS[model]["script"])
    with tempfile.TemporaryDirectory() as output_dir:
        flags = build_parser(objective).parse(validate_argv(model, checkpoint, output_dir, cache))
    family = family_of_objective(objective.name)
    plan = resolve_validation(flags, family, family.validate_script)
    accelerator = Accelerator(cpu=True)
    tokenizer = plan.preprocessor
    net = load_checkpoint(plan.model, plan.config, accelerator.device)
    loss_module = objective.loss_class(net).eval()
    dataset = prepare_splits(plan.data, ("validation",), tokenizer, SEQ_LENGTH, accelerator)["validation"]
    targets = objective.targets(tokenizer, net.config, flags.get("objective"))
    dataset = objective.evaluation_set(dataset, targets, flags.evaluation.seed)
    batch, config = SETUPS[model]["batch"], net.config
    inputs = probe_inputs(net.family, tokenizer, config)

    def plain() -> float:
        start = time.perf_counter()
        evaluate(accelerator, loss_module, dataset, objective, batch)
        return time.perf_counter() - start

    def with_statistics() -> float:
        start = time.perf_counter()
        activations = ActivationStatistics(net, net.outlier_sites(), config.hidden_size, config.vocab_size)
        attention = AttentionStatistics(net, inputs)
        evaluate(accelerator, loss_module, dataset, objective, batch, probes=(activations, attention))
        figures = activations.synced(accelerator), attention.synced(accelerator)
        outlier_results(*figures, net.headlines, inputs.token_name)
        return time.perf_counter() - start

    plain()  # warm-up: allocator, kernels, page cache
    times = {"plain": [], "statistics": []}
    for _ in range(rounds):
        times["plain"].append(plain())
        times["statistics"].append(with_statistics())
    return times | {"blocks": len(dataset)}


def _mode_flags(model: str, mode: str) -> list[str]:
    return [*PRECISION_MODES[mode], *(W8A8_EXTRA[model] if mode == "w8a8" else [])]


def child_modes(model: str, checkpoint: str, cache: str, rounds: int) -> dict:
    """Each precision mode's whole validation job, alternating in this process after an untimed round."""
    sys.path.insert(0, str(REPO))
    from transformers_language.jobs.validate import validate

    seconds = {mode: [] for mode in PRECISION_MODES}
    for round_number in range(rounds + 1):
        for mode in PRECISION_MODES:
            with tempfile.TemporaryDirectory() as output_dir:
                argv = [*validate_argv(model, checkpoint, output_dir, cache), *_mode_flags(model, mode)]
                start = time.perf_counter()
                validate(SETUPS[model]["script"], argv)
                if round_number:  # round 0 caches the calibration data and warms up
                    seconds[mode].append(time.perf_counter() - start)
    return seconds


def precision_rows(model: str, checkpoint: str, cache: str, rounds: int) -> dict:
    command = [sys.executable, __file__, "--rounds", str(rounds), "--precision_child", model, checkpoint, cache]
    done = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"precision {model} failed:\n{done.stderr[-4000:]}")
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    fp32 = statistics.median(timed["fp32"])
    rows = {}
    for mode, seconds in timed.items():
        median = statistics.median(seconds)
        rss = _process_run(model, checkpoint, cache, tuple(_mode_flags(model, mode)))["peak_rss_gib"]
        rows[mode] = {"median_seconds": median, "vs_fp32": fp32 / median, "peak_rss_gib": rss}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="Process runs, and loop pairs, per model.")
    parser.add_argument("--models", nargs="+", default=["bert", "opt"], choices=list(SETUPS))
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--precision", action="store_true", help="Only the precision rows (fp32, bf16, W8A8).")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # model checkpoint cache
    parser.add_argument("--precision_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_overhead(*args.child, rounds=args.rounds)))
        return
    if args.precision_child:
        print(json.dumps(child_modes(*args.precision_child, rounds=args.rounds)))
        return

    figures = {}
    for model, checkpoint, cache in prepared_checkpoints(args.models):
        precision = precision_rows(model, checkpoint, cache, args.rounds)
        if args.precision:
            figures[model] = {"precision": precision}
            continue
        processes = []
        for _ in range(args.rounds):
            processes.append(_process_run(model, checkpoint, cache))
            print(f"  {model} process: {processes[-1]['seconds']:.1f} s", file=sys.stderr)
        command = [sys.executable, __file__, "--rounds", str(args.rounds), "--child", model, checkpoint, cache]
        done = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"overhead {model} failed:\n{done.stderr[-4000:]}")
        loops = json.loads(done.stdout.strip().splitlines()[-1])
        figures[model] = _summarise(model, processes, loops) | {"precision": precision}
    _report(figures)
    if args.json:
        write_json_atomic(Path(args.json), figures)


def _summarise(model: str, processes: list[dict], loops: dict) -> dict:
    seconds = statistics.median(run["seconds"] for run in processes)
    rss = max(run["peak_rss_gib"] for run in processes)
    plain, with_stats = statistics.median(loops["plain"]), statistics.median(loops["statistics"])
    paper = PAPER[model]
    return {
        "process_seconds": seconds,
        "peak_rss_gib": rss,
        "validation_blocks": loops["blocks"],
        "perplexity": processes[0]["perplexity"],
        "loop_seconds_plain": plain,
        "loop_seconds_with_statistics": with_stats,
        "statistics_overhead": with_stats / plain - 1,
        "speedup_vs_paper": [s / seconds for s in paper["seconds"]],
        "rss_vs_paper": [rss / gib for gib in paper["rss_gib"]],
    }


def _report(figures: dict) -> None:
    print(f"{'model':6} {'validation':11} {'seconds':>8} {'x fp32':>7} {'peak RSS GiB':>13}")
    for model, r in figures.items():
        for mode, row in r["precision"].items():
            print(f"{model:6} {mode:11} {row['median_seconds']:8.2f} {row['vs_fp32']:7.2f} {row['peak_rss_gib']:13.2f}")
    for model, r in figures.items():
        if "process_seconds" not in r:
            continue
        paper = PAPER[model]
        print(
            f"{model}: validate process {r['process_seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
            f"({r['validation_blocks']} blocks of {SEQ_LENGTH}); paper {paper['seconds'][0]}-{paper['seconds'][1]} s, "
            f"{paper['rss_gib'][0]}-{paper['rss_gib'][1]} GiB -> {min(r['speedup_vs_paper']):.1f}-"
            f"{max(r['speedup_vs_paper']):.1f}x faster, {min(r['rss_vs_paper']):.2f}-{max(r['rss_vs_paper']):.2f}x RSS"
        )
        print(
            f"{model}: evaluation loop {r['loop_seconds_plain']:.2f} s plain, "
            f"{r['loop_seconds_with_statistics']:.2f} s with statistics: +{100 * r['statistics_overhead']:.1f}%"
        )


if __name__ == "__main__":
    main()
