#!/usr/bin/env bash
# Llama-60M, elementwise output gate (Qiu et al.'s G1: one sigmoid per context channel, after SDPA). Training:
# scripts/lib/llama_60m.sh.
# Usage: scripts/llama_60m_gated_elementwise.sh [--accelerate_config FILE] [flags of run_llama.py that override these]
set -euo pipefail
RUN=llama_60m_gated_elementwise
METHOD=(--attn_gate_type elementwise)
source "$(dirname "$0")/lib/llama_60m.sh"
