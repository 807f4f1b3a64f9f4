"""Forward+backward time of one BERT attention block per attention variant, interleaved A/B.

One `BertAttention` block (Q/K/V, attention, output projection, residual LayerNorm) at BERT-base shape
(B=8, T=128, d=768, 12 heads) in fp32. Each round times every variant once in a shuffled order, and ratios
are taken within a round (variant / baseline of the same round) before the median over rounds, so slow
machine drift cancels. Baselines: the fused vanilla path and the explicit vanilla path (the path clipped
softmax must take, and the one any metric on the probabilities forces).

    python benchmarks/bench_attention.py [--rounds 30] [--device cpu|cuda] [--json results.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig

from transformers_language import AttentionConfig, build_model
from transformers_language.files import write_json_atomic

VARIANTS = {
    "vanilla (fused)": {},
    "vanilla (explicit)": {},
    "clipped(-0.025:1)": {"softmax": "clipped(-0.025:1)"},
    "gate linear per_token": {"gate_type": "conditional_per_token"},
    "gate mlp per_token": {"gate_type": "conditional_per_token", "gate_network": "mlp"},
    "gate mlp2 per_token": {"gate_type": "conditional_per_token", "gate_network": "mlp2"},
    "gate all_heads_linear": {"gate_type": "conditional_per_token", "gate_network": "all_heads_linear"},
    "gate linear per_head": {"gate_type": "conditional_per_head"},
    "gate unconditional": {"gate_type": "unconditional_per_head"},
    "clipped + gate linear": {"softmax": "clipped(-0.025:1)", "gate_type": "conditional_per_token"},
    "softmax1": {"softmax": "softmax1"},
    "clipped softmax1": {"softmax": "clipped_softmax1(-0.025:1)"},
    "learned sink": {"softmax": "sink"},
    "learned key/value": {"bias_kv": True},
    "softpick": {"softmax": "softpick"},
    "sigmoid": {"softmax": "sigmoid", "train_seq_length": 128},
    "output gate headwise": {"gate_type": "headwise"},
    "output gate elementwise": {"gate_type": "elementwise"},
}
TARGETS = {  # (variant, baseline, maximum ratio) from the issues
    "gate linear per_token": ("vanilla (fused)", 1.02),
    "gate mlp per_token": ("vanilla (fused)", 1.05),
    "clipped(-0.025:1)": ("vanilla (explicit)", 1.05),
    "softmax1": ("vanilla (fused)", 1.15),
    "clipped softmax1": ("vanilla (fused)", 1.15),
    "learned sink": ("vanilla (fused)", 1.15),
    "learned key/value": ("vanilla (fused)", 1.15),
    "softpick": ("vanilla (fused)", 1.15),
    "sigmoid": ("vanilla (fused)", 1.15),
    "output gate headwise": ("vanilla (fused)", 1.05),
    "output gate elementwise": ("vanilla (fused)", 1.05),
}


def attention_block(attention: dict, args, device):
    config = BertConfig(
        hidden_size=args.hidden, num_attention_heads=args.heads, num_hidden_layers=1, intermediate_size=4 * args.hidden
    )
    torch.manual_seed(0)
    model = build_model(config, AttentionConfig(**attention)).to(device).train()
    return model.bert.encoder.layer[0].attention, model


def step(block, x, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = block(x)[0]
    out.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    blocks = {}
    for name, attention in VARIANTS.items():
        block, model = attention_block(attention, args, device)
        if name == "vanilla (explicit)":  # a probs observer forces the explicit path, as metrics would
            for variant in model.attention_variants().values():
                variant.probs.register_forward_hook(lambda *a: None)
        blocks[name] = block
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, requires_grad=True)

    times = {name: [] for name in blocks}
    order = list(blocks)
    for round_index in range(args.warmup + args.rounds):
        random.Random(round_index).shuffle(order)
        for name in order:
            elapsed = step(blocks[name], x, device)
            if round_index >= args.warmup:
                times[name].append(elapsed)

    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}

    def paired(name: str, baseline: str) -> tuple[float, float, float]:
        """Median and interquartile range of the per-round ratios name / baseline."""
        ratios = [a / b for a, b in zip(times[name], times[baseline], strict=True)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        return q2, q1, q3

    to_fused = {name: paired(name, "vanilla (fused)") for name in times}
    to_explicit = {name: paired(name, "vanilla (explicit)") for name in times}
    print(
        f"one BERT attention block, fwd+bwd, B={args.batch} T={args.seq} d={args.hidden} H={args.heads}, "
        f"{device.type}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    print(f"{'variant':24s} {'median ms':>9s}   {'x fused (IQR)':>21s}   {'x explicit (IQR)':>21s}")
    for name, ms in median.items():
        (f2, f1, f3), (e2, e1, e3) = to_fused[name], to_explicit[name]
        print(f"{name:24s} {ms:9.2f}   {f2:6.3f} ({f1:.3f}-{f3:.3f})   {e2:6.3f} ({e1:.3f}-{e3:.3f})")
    speedup = 1.0 / to_explicit["vanilla (fused)"][0]
    print(f"fused path speed-up over the explicit path: {speedup:.3f}x")
    checks = {}
    for name, (baseline, limit) in TARGETS.items():
        ratio = (to_fused if baseline == "vanilla (fused)" else to_explicit)[name][0]
        checks[name] = {"baseline": baseline, "ratio": ratio, "target": limit, "met": ratio <= limit}
        print(f"target {name} <= {limit}x {baseline}: {ratio:.3f}x {'met' if ratio <= limit else 'MISSED'}")
    if args.json:
        result = {
            "settings": vars(args) | {"threads": torch.get_num_threads()},
            "median_ms": median,
            "ratio_to_fused": {name: value[0] for name, value in to_fused.items()},
            "ratio_to_explicit": {name: value[0] for name, value in to_explicit.items()},
            "fused_speedup": speedup,
            "targets": checks,
        }
        write_json_atomic(Path(args.json), result)


if __name__ == "__main__":
    main()
