#!/usr/bin/env bash
# W8A8 evaluation of a Llama checkpoint as the paper ran OPT: MSE weight ranges, running min-max activation ranges
# from the 99.999th percentiles over 16 training batches, FP head. Written to CHECKPOINT/eval-w8a8.
# Usage: scripts/validate_llama_w8a8.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_llama.py that override these]
set -euo pipefail
PRESET_ACCELERATE_CONFIG=1gpu_bf16.yaml
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_llama.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_setup bookcorpus_and_wiki --block_size 2048 --per_device_eval_batch_size 4 --quantize --ranges_weights MSE --percentile 99.999 \
  --output_dir "$CHECKPOINT/eval-w8a8" "${ARGS[@]}"
