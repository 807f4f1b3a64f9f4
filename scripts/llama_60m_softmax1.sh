#!/usr/bin/env bash
# Llama-60M, softmax1 (1 added to the softmax's denominator). Training: scripts/lib/llama_60m.sh.
# Usage: scripts/llama_60m_softmax1.sh [--accelerate_config FILE] [flags of run_llama.py that override these]
set -euo pipefail
RUN=llama_60m_softmax1
METHOD=(--attn_softmax softmax1)
source "$(dirname "$0")/lib/llama_60m.sh"
