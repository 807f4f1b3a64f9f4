#!/usr/bin/env bash
# W8A8 evaluation of a BERT checkpoint as the paper ran it: min-max weight ranges, running min-max activation
# ranges over 16 training batches, FP head; the same masks as validate_bert.sh. Written to CHECKPOINT/eval-w8a8.
# Usage: scripts/validate_bert_w8a8.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_mlm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_mlm.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_setup bookcorpus_and_wiki --per_device_eval_batch_size 32 --quantize \
  --output_dir "$CHECKPOINT/eval-w8a8" "${ARGS[@]}"
