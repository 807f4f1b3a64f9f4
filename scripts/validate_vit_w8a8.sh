#!/usr/bin/env bash
# W8A8 evaluation of a ViT checkpoint with the language models' W8A8 settings (min-max weight ranges, running
# min-max activation ranges over 16 training batches of 256 images with the evaluation transform, FP head).
# Written to CHECKPOINT/eval-w8a8.
# Usage: scripts/validate_vit_w8a8.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_vit.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_vit.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_name ILSVRC/imagenet-1k --per_device_eval_batch_size 256 --quantize \
  --output_dir "$CHECKPOINT/eval-w8a8" "${ARGS[@]}"
