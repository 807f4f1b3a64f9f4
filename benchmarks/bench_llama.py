"""Llama-small against stock HF Llama: training tokens/s of every variant, and validation time FP vs W8A8.

training    model_configs/llama-small.yaml (4 layers, hidden 256, 4 query / 2 key-value heads, SwiGLU 704, 8k
            vocabulary), batch 32 x 128 random tokens, `model(input_ids, labels).loss`, backward and an AdamW
            step, 2 CPU threads: stock `LlamaForCausalLM` (its default SDPA attention) and our class with the same
            weights, vanilla and each variant, in fp32 and in bf16 autocast; each model runs `--steps` steps per
            round, the models alternate round by round in one process after an untimed round, and the figure is
            the ratio of median step times (>1: ours faster). Vanilla's target is parity (0.97-1.03x); a
            variant's ratio is its overhead.
validation  the whole validate_llama.py job (load, tokenize, evaluate every statistic, report) on all of the
            enwiki slice's valid.txt (128-token blocks) in FP and as the W8A8 simulation (--quantize: 16 calibration
            batches of 8 blocks of train.txt, MSE weight ranges), alternating after an untimed round; the ratio
            of medians (target: W8A8 within 1.2x of FP).

  python benchmarks/bench_llama.py [--rounds 3] [--steps 10] [--only training|validation] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED

sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from transformers_language import AttentionConfig, build_model
from transformers_language.files import write_json_atomic

BATCH, LENGTH, VOCAB = 32, 128, 8192
ENWIKI = SHARED / "data" / "enwiki-slice"
# The variants timed against stock HF (vanilla first): the paper's, the output gates, the no-op normalisers.
VARIANTS = {
    "vanilla": {},
    "clipped_softmax": {"alpha": 12.0, "train_seq_length": LENGTH},
    "gated_attention": {"gate_type": "conditional_per_token", "init_prob": 0.25},
    "headwise_gate": {"gate_type": "headwise"},
    "elementwise_gate": {"gate_type": "elementwise"},
    "softmax1": {"softmax": "softmax1"},
    "learned_sink": {"softmax": "sink"},
    "bias_kv": {"bias_kv": True},
}
PRECISIONS = ("fp32", "bf16")


def llama_small_config(**overrides) -> LlamaConfig:
    settings = yaml.safe_load((REPO / "model_configs" / "llama-small.yaml").read_text())
    fixed = {"vocab_size": VOCAB, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
    return LlamaConfig(**(fixed | settings | overrides))


def models() -> dict[str, torch.nn.Module]:
    """Stock HF Llama-small and ours, vanilla with its weights and each variant (the same weights plus its own)."""
    torch.manual_seed(0)
    nets = {"stock": LlamaForCausalLM(llama_small_config())}
    for name, attention in VARIANTS.items():
        nets[name] = build_model(llama_small_config(), AttentionConfig(**attention))
        nets[name].load_state_dict(nets["stock"].state_dict(), strict=False)
    return nets


def step_seconds(net: torch.nn.Module, optimizer, batches: list[torch.Tensor], precision: str) -> list[float]:
    seconds = []
    net.train()
    for ids in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def training(rounds: int, steps: int) -> dict:
    nets = models()
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=1e-4) for name, net in nets.items()}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator) for _ in range(steps)]
    figures = {}
    for precision in PRECISIONS:
        for name, net in nets.items():  # untimed: kernels, allocator, optimizer state
            step_seconds(net, optimizers[name], batches[:2], precision)
        timed = {name: [] for name in nets}
        for _ in range(rounds):
            for name, net in nets.items():
                timed[name] += step_seconds(net, optimizers[name], batches, precision)
        stock = statistics.median(timed["stock"])
        figures[precision] = {
            name: {
                "tokens_per_s": BATCH * LENGTH / statistics.median(seconds),
                "vs_stock": stock / statistics.median(seconds),
            }
            for name, seconds in timed.items()
        }
    return figures


def validation_argv(checkpoint: str, output_dir: str, quantize: bool) -> list[str]:
    argv = ["--model_name_or_path", checkpoint, "--validation_file", str(ENWIKI / "valid.txt")]
    argv += ["--validation_percentage", "100", "--block_size", str(LENGTH), "--per_device_eval_batch_size", "16"]
    argv += ["--output_dir", output_dir]
    if quantize:
        argv += ["--quantize", "--train_file", str(ENWIKI / "train.txt"), "--train_percentage", "2"]
        argv += ["--ranges_weights", "MSE"]
    return argv


def validation(rounds: int) -> dict:
    from transformers import AutoTokenizer

    import validate_llama

    def seconds(checkpoint: str, quantize: bool) -> float:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            validate_llama.main(validation_argv(checkpoint, folder, quantize))
            return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt-bpe-8k")
        torch.manual_seed(0)
        model = build_model(llama_small_config(vocab_size=len(tokenizer)))  # the weights do not change the cost
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        seconds(folder, False), seconds(folder, True)  # untimed: tokenization cache, kernels
        timed = {"fp": [], "w8a8": []}
        for _ in range(rounds):
            timed["fp"].append(seconds(folder, False))
            timed["w8a8"].append(seconds(folder, True))
    fp, w8a8 = statistics.median(timed["fp"]), statistics.median(timed["w8a8"])
    return {"fp_seconds": fp, "w8a8_seconds": w8a8, "w8a8_over_fp": w8a8 / fp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="Training steps per model and round.")
    parser.add_argument("--only", choices=["training", "validation"], help="One part only.")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    figures = {"setup": {"model": "llama-small", "batch": BATCH, "length": LENGTH, "threads": 2, "rounds": args.rounds}}
    if args.only != "validation":
        figures["training"] = training(args.rounds, args.steps)
        for precision, rows in figures["training"].items():
            for name, row in rows.items():
                print(f"{precision:5} {name:17} {row['tokens_per_s']:9.0f} tokens/s  x{row['vs_stock']:.3f} of stock")
    if args.only != "training":
        figures["validation"] = timed = validation(args.rounds)
        print(
            f"validation: FP {timed['fp_seconds']:.1f} s, W8A8 {timed['w8a8_seconds']:.1f} s "
            f"(x{timed['w8a8_over_fp']:.2f})"
        )
    if args.json:
        write_json_atomic(Path(args.json), figures)


if __name__ == "__main__":
    main()
