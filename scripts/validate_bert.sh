#!/usr/bin/env bash
# FP evaluation of a BERT checkpoint (any preset's): perplexity on the fixed masks of --seed, outlier statistics
# and plots, written to CHECKPOINT/eval-fp.
# Usage: scripts/validate_bert.sh CHECKPOINT [--accelerate_config FILE] [flags of validate_mlm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/checkpoint.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/validate_mlm.py" \
  --model_name_or_path "$CHECKPOINT" \
  --dataset_setup bookcorpus_and_wiki --per_device_eval_batch_size 32 --plot \
  --output_dir "$CHECKPOINT/eval-fp" "${ARGS[@]}"
