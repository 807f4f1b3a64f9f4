# Sourced by the scripts/llama_60m_*.sh presets, which set RUN (the output folder's name) and METHOD (the method
# flags) first: Llama-60M (Gu et al.'s sink-study model, model_configs/llama-60m.yaml) trained after Gu et al.,
# about 5B tokens (5000 steps of 512 x 2048 tokens), lr 4e-4 with 500 warmup steps and a cosine decay to 10%,
# weight decay 0.1, AdamW (0.9, 0.95), bf16; on the hub's BookCorpus + Wikipedia (their Pile sample is not on the
# hub) with a Llama-2 tokenizer (TinyLlama's, 32k). Flags after the preset's own override these.
PRESET_ACCELERATE_CONFIG=1gpu_bf16.yaml
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
accelerate launch --config_file "$ACCELERATE_CONFIG" "$ROOT/run_llama.py" \
  --dataset_setup bookcorpus_and_wiki --tokenizer_name TinyLlama/TinyLlama_v1.1 \
  --config_path "$ROOT/model_configs/llama-60m.yaml" --block_size 2048 --block_layout bos_first \
  --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --gradient_accumulation_steps 32 \
  --learning_rate 4e-4 --num_warmup_steps 500 --max_train_steps 5000 --lr_scheduler_type cosine \
  --final_lr_fraction 0.1 --weight_decay 0.1 \
  --with_tracking --extra_tb_stats --tb_scalar_log_interval 100 --tb_hist_log_interval 1000 \
  --checkpointing_steps 500 \
  "${METHOD[@]}" \
  --output_dir "runs/$RUN" "${ARGS[@]}"
