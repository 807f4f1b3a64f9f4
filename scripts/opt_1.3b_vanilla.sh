#!/usr/bin/env bash
# OPT-1.3B (24 layers, 32 heads, pre-LN, hidden 2048), vanilla softmax (100k steps, batch 14 x 18
# accumulation, lr 4e-4, 2k warmup, block 512, weight decay 0.1).
# Usage: scripts/opt_1.3b_vanilla.sh [--accelerate_config FILE] [flags of run_clm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_clm.py" \
  --dataset_setup bookcorpus_and_wiki --tokenizer_name facebook/opt-1.3b \
  --config_path "$ROOT/model_configs/opt-1.3b.yaml" --block_size 512 \
  --per_device_train_batch_size 14 --per_device_eval_batch_size 14 --gradient_accumulation_steps 18 \
  --learning_rate 4e-4 --num_warmup_steps 2000 --max_train_steps 100000 --weight_decay 0.1 \
  --with_tracking --checkpointing_steps 1000 \
  --output_dir runs/opt_1.3b_vanilla "${ARGS[@]}"
