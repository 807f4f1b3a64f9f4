#!/usr/bin/env bash
# Evaluation of a ViT checkpoint on the ImageNet-1k validation images (resize 256, center crop 224): top-1 /
# top-5 accuracy, outlier statistics and attention diagnostics. Written to CHECKPOINT/eval-fp.
# Usage: scripts/validate_vit.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_vit.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_vit.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_name ILSVRC/imagenet-1k --per_device_eval_batch_size 256 \
  --output_dir "$CHECKPOINT/eval-fp" "${ARGS[@]}"
