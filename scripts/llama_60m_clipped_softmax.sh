#!/usr/bin/env bash
# Llama-60M, clipped softmax with the paper's OPT alpha 12 (gamma = -12 / 2048, zeta 1). Training:
# scripts/lib/llama_60m.sh.
# Usage: scripts/llama_60m_clipped_softmax.sh [--accelerate_config FILE] [flags of run_llama.py that override these]
set -euo pipefail
RUN=llama_60m_clipped_softmax
METHOD=(--alpha 12)
source "$(dirname "$0")/lib/llama_60m.sh"
