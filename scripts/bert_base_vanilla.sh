#!/usr/bin/env bash
# BERT-base (12 layers, 12 heads; the default BERT config), vanilla softmax: the paper's BERT baseline
# (1M steps, batch 256, lr 1e-4, 10k warmup, seq 128, weight decay 0.01).
# Usage: scripts/bert_base_vanilla.sh [--accelerate_config FILE] [flags of run_mlm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_mlm.py" \
  --dataset_setup bookcorpus_and_wiki --tokenizer_name bert-base-uncased \
  --per_device_train_batch_size 256 --per_device_eval_batch_size 256 --learning_rate 1e-4 \
  --num_warmup_steps 10000 --max_train_steps 1000000 --weight_decay 0.01 \
  --with_tracking --extra_tb_stats --tb_scalar_log_interval 2000 --tb_hist_log_interval 100000 \
  --checkpointing_steps 100000 \
  --output_dir runs/bert_base_vanilla "${ARGS[@]}"
