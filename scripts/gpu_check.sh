#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device: the `gpu` tests (bf16 + compiled training steps of BERT, OPT
# and ViT, an exact bf16 resume, FP and W8A8 validation on CUDA against the CPU, the SDPA path) and the training
# benchmark's precision rows (fp32, bf16, bf16 + compile) on CUDA, then one table of both. About 5-8 minutes.
#
#     bash scripts/gpu_check.sh [OUTPUT_DIR]     # default runs/gpu-check; PYTHON picks the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
python=${PYTHON:-python}
"$python" -c "import torch" 2>/dev/null || {
    echo "gpu_check: $python cannot import torch; set PYTHON to the project's interpreter (.venv/bin/python)" >&2
    exit 2
}
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch sees no CUDA device here; run it on a machine with a GPU" >&2
    exit 2
}
mkdir -p "$out"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS, for the exact resume
timeout 330 "$python" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$out/tests.xml" \
    > "$out/tests.log" 2>&1
timeout 270 "$python" benchmarks/bench_train.py --precision --steps 30 --json "$out/bench_train.json" \
    > "$out/bench_train.log" 2>&1
"$python" scripts/gpu_table.py "$out"
