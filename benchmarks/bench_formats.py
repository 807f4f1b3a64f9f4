"""The 2024-26 quantization pieces in isolation, in this process (2 threads, fp32, median of --repeats):

quantizers   one frozen activation quantizer on a (tokens, width) tensor: FP8 E4M3 per tensor, MXFP4, NVFP4
             and per-token int8, each as a ratio to the integer per-tensor quantizer (the W8A8 baseline)
hadamard     the fast Walsh-Hadamard transform (butterfly, Kronecker form for 1536 = 2^7 x 12) against the
             dense product with the same matrix, on (tokens, n)
gptq         GPTQ of one Linear (4-bit per-channel grid, blocks of 128, with and without act-order) and the
             Hessian accumulation over the calibration tokens, seconds per layer, beside round-to-nearest

  python benchmarks/bench_formats.py [--tokens 4096] [--repeats 5] [--only quantizers hadamard gptq] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from quantization.dynamic import TokenQuantizer
from quantization.float_quantizers import BlockQuantizer, FloatQuantizer
from quantization.gptq import HessianAccumulator, gptq, round_to_grid
from quantization.hadamard import hadamard_matrix, hadamard_transform
from quantization.quantizer import Quantizer
from transformers_language.files import write_json_atomic

SECTIONS = ("quantizers", "hadamard", "gptq")


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _frozen(quantizer: Quantizer, x: torch.Tensor) -> Quantizer:
    quantizer.set_mode("observe")
    quantizer(x)
    quantizer.freeze()
    return quantizer


@torch.no_grad()
def bench_quantizers(tokens: int, repeats: int, width: int = 1024) -> dict:
    x = torch.randn(tokens, width)
    quantizers = {
        "int8_per_tensor": _frozen(Quantizer(8), x),
        "int8_per_token": _frozen(TokenQuantizer(8), x),
        "fp8_e4m3_per_tensor": _frozen(FloatQuantizer("e4m3"), x),
        "mxfp4": _frozen(BlockQuantizer("mxfp4"), x),
        "nvfp4": _frozen(BlockQuantizer("nvfp4"), x),
    }
    seconds = {name: _median_seconds(lambda q=q: q(x), repeats) for name, q in quantizers.items()}
    base = seconds["int8_per_tensor"]
    return {name: {"ms": s * 1e3, "ratio_to_int8": s / base} for name, s in seconds.items()}


@torch.no_grad()
def bench_hadamard(tokens: int, repeats: int) -> dict:
    figures = {}
    for n in (1024, 1536, 4096):
        x = torch.randn(tokens, n)
        matrix = hadamard_matrix(n).T / n**0.5
        fast = _median_seconds(lambda x=x: hadamard_transform(x), repeats)
        dense = _median_seconds(lambda x=x, m=matrix: x @ m, repeats)
        figures[str(n)] = {"fast_ms": fast * 1e3, "dense_ms": dense * 1e3, "fast_over_dense": fast / dense}
    return figures


@torch.no_grad()
def bench_gptq(tokens: int, repeats: int) -> dict:
    figures = {}
    for rows, columns in ((1024, 1024), (4096, 1024), (1024, 4096)):
        weight, inputs = torch.randn(rows, columns), torch.randn(tokens, columns)
        accumulator = HessianAccumulator(columns)
        hessian_s = _median_seconds(lambda a=accumulator, x=inputs: a.add(x), repeats)
        hessian = accumulator.hessian()
        scale = weight.abs().amax(1, keepdim=True) / 7
        grid = (scale, torch.zeros_like(scale, dtype=torch.int32), -8, 7)
        rounds = max(1, repeats // 2)
        rtn = _median_seconds(lambda w=weight, g=grid: round_to_grid(w, *g), rounds)
        plain = _median_seconds(lambda w=weight, h=hessian, g=grid: gptq(w, h, *g), rounds)
        ordered = _median_seconds(lambda w=weight, h=hessian, g=grid: gptq(w, h, *g, act_order=True), rounds)
        figures[f"{rows}x{columns}"] = {
            "hessian_ms_per_batch": hessian_s * 1e3,
            "gptq_s": plain,
            "gptq_act_order_s": ordered,
            "rtn_ms": rtn * 1e3,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="Rows of the activation / calibration tensors.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    benches = {"quantizers": bench_quantizers, "hadamard": bench_hadamard, "gptq": bench_gptq}
    figures = {}
    for section in args.only:
        figures[section] = benches[section](args.tokens, args.repeats)
        for name, values in figures[section].items():
            print(f"{section} {name}: " + ", ".join(f"{key} {value:.3g}" for key, value in values.items()))
    if args.json:
        write_json_atomic(Path(args.json), figures)


if __name__ == "__main__":
    main()
