#!/usr/bin/env bash
# OPT-125m (12 layers, 12 heads, pre-LN), vanilla softmax: the paper's OPT baseline (125k steps, batch
# 48 x 4 accumulation, lr 4e-4, 2k warmup, block 512, weight decay 0.1 also on LayerNorm gamma).
# Usage: scripts/opt_125m_vanilla.sh [--accelerate_config FILE] [flags of run_clm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_clm.py" \
  --dataset_setup bookcorpus_and_wiki --tokenizer_name facebook/opt-125m \
  --config_path "$ROOT/model_configs/opt-12L12H.yaml" --block_size 512 \
  --per_device_train_batch_size 48 --per_device_eval_batch_size 48 --gradient_accumulation_steps 4 \
  --learning_rate 4e-4 --num_warmup_steps 2000 --max_train_steps 125000 --weight_decay 0.1 --wd_LN_gamma \
  --with_tracking --extra_tb_stats --tb_scalar_log_interval 2000 --tb_hist_log_interval 10000 \
  --checkpointing_steps 10000 \
  --output_dir runs/opt_125m_vanilla "${ARGS[@]}"
