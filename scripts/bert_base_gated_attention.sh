#!/usr/bin/env bash
# BERT-base, gated attention: conditional per-token MLP gate (d_head -> d_head/4 -> 1), init 0.5; training
# as bert_base_vanilla.sh.
# Usage: scripts/bert_base_gated_attention.sh [--accelerate_config FILE] [flags of run_mlm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_mlm.py" \
  --dataset_setup bookcorpus_and_wiki --tokenizer_name bert-base-uncased \
  --per_device_train_batch_size 256 --per_device_eval_batch_size 256 --learning_rate 1e-4 \
  --num_warmup_steps 10000 --max_train_steps 1000000 --weight_decay 0.01 \
  --with_tracking --extra_tb_stats --tb_scalar_log_interval 2000 --tb_hist_log_interval 100000 \
  --checkpointing_steps 100000 \
  --attn_gate_type conditional_per_token --attn_gate_mlp \
  --output_dir runs/bert_base_gated_attention "${ARGS[@]}"
