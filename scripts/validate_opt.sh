#!/usr/bin/env bash
# FP evaluation of an OPT checkpoint (any preset's) on 512-token blocks: perplexity, outlier statistics and
# plots, written to CHECKPOINT/eval-fp.
# Usage: scripts/validate_opt.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_clm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_clm.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_setup bookcorpus_and_wiki --block_size 512 --per_device_eval_batch_size 4 --plot \
  --output_dir "$CHECKPOINT/eval-fp" "${ARGS[@]}"
