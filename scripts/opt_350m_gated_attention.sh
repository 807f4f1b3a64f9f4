#!/usr/bin/env bash
# OPT-350m, gated attention: conditional per-token linear gate, init 0.25; training as
# opt_350m_vanilla.sh.
# Usage: scripts/opt_350m_gated_attention.sh [--accelerate_config FILE] [flags of run_clm.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_clm.py" \
  --dataset_setup bookcorpus_and_wiki --tokenizer_name facebook/opt-350m \
  --config_path "$ROOT/model_configs/opt-350m.yaml" --block_size 512 \
  --per_device_train_batch_size 24 --per_device_eval_batch_size 24 --gradient_accumulation_steps 11 \
  --learning_rate 4e-4 --num_warmup_steps 2000 --max_train_steps 100000 --weight_decay 0.1 \
  --with_tracking --checkpointing_steps 1000 \
  --attn_gate_type conditional_per_token --attn_gate_init 0.25 \
  --output_dir runs/opt_350m_gated_attention "${ARGS[@]}"
