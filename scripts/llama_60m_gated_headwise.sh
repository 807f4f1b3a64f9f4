#!/usr/bin/env bash
# Llama-60M, headwise output gate (Qiu et al.'s G1: one sigmoid(Linear(x)) per head and token, after SDPA).
# Training: scripts/lib/llama_60m.sh.
# Usage: scripts/llama_60m_gated_headwise.sh [--accelerate_config FILE] [flags of run_llama.py that override these]
set -euo pipefail
RUN=llama_60m_gated_headwise
METHOD=(--attn_gate_type headwise)
source "$(dirname "$0")/lib/llama_60m.sh"
