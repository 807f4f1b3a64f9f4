#!/usr/bin/env bash
# FP evaluation of a Llama checkpoint (any llama_* preset's) on 2048-token blocks: perplexity, outlier statistics
# (down-projection input, first-token figures) and plots, written to CHECKPOINT/eval-fp.
# Usage: scripts/validate_llama.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_llama.py that override these]
set -euo pipefail
PRESET_ACCELERATE_CONFIG=1gpu_bf16.yaml
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_llama.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_setup bookcorpus_and_wiki --block_size 2048 --per_device_eval_batch_size 4 --plot \
  --output_dir "$CHECKPOINT/eval-fp" "${ARGS[@]}"
