#!/usr/bin/env bash
# ViT-S/16 on ImageNet-1k, clipped softmax (gamma = -0.0001, zeta = 1) with a LayerNorm after the patch
# embedding (Table 2). Training as scripts/vit_s16_vanilla.sh.
# Usage: scripts/vit_s16_clipped_softmax.sh [--accelerate_config FILE] [flags of run_vit.py that override these]
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_vit.py" \
  --config_path "$ROOT/model_configs/vit-s16-patch-layernorm.yaml" \
  --dataset_name ILSVRC/imagenet-1k --image_size 224 --dataloader_num_workers 8 \
  --per_device_train_batch_size 512 --per_device_eval_batch_size 256 \
  --learning_rate 1e-3 --lr_scheduler_type cosine --num_train_epochs 300 --num_warmup_steps 12510 \
  --weight_decay 0.05 --max_grad_norm 1.0 \
  --label_smoothing 0.1 --randaugment_num_ops 2 --randaugment_magnitude 9 --mixup_alpha 0.8 --cutmix_alpha 1.0 \
  --with_tracking --extra_tb_stats --tb_scalar_log_interval 2500 --tb_hist_log_interval 125000 \
  --checkpointing_steps 25000 \
  --attn_softmax "clipped(-0.0001:1)" \
  --output_dir runs/vit_s16_clipped_softmax "${ARGS[@]}"
