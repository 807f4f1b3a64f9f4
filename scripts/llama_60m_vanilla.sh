#!/usr/bin/env bash
# Llama-60M, vanilla softmax attention. Training: scripts/lib/llama_60m.sh.
# Usage: scripts/llama_60m_vanilla.sh [--accelerate_config FILE] [flags of run_llama.py that override these]
set -euo pipefail
RUN=llama_60m_vanilla
METHOD=()
source "$(dirname "$0")/lib/llama_60m.sh"
