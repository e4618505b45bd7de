#!/usr/bin/env bash
# The published recipe, kept as the baseline: pairwise DPO through ms-swift on the rows `apo build-pairs --dpo-out`
# writes (one row per (t+, teacher) pair). Defaults are the paper's preference-stage recipe (arXiv 2510.04142).
#
#   MODEL=runs/sft/merged DATASET=runs/apo/dpo_pairs.jsonl NPROC_PER_NODE=4 bash scripts/DPO-Qwen2.5.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"

MODEL="${MODEL:-$ROOT/runs/sft/merged}"
DATASET="${DATASET:-$ROOT/runs/apo/dpo_pairs.jsonl}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/runs/dpo}"
NPROC_PER_NODE="${NPROC_PER_NODE:-4}"
BETA="${BETA:-0.1}"
LEARNING_RATE="${LEARNING_RATE:-5e-7}"
NUM_TRAIN_EPOCHS="${NUM_TRAIN_EPOCHS:-1}"
BATCH_SIZE="${BATCH_SIZE:-2}"
GRAD_ACC="${GRAD_ACC:-$(( 16 / NPROC_PER_NODE > 0 ? 16 / NPROC_PER_NODE : 1 ))}"
MAX_LENGTH="${MAX_LENGTH:-4096}"
# The pixel budget pi_st was trained with (ms-swift reads it through qwen-vl-utils); README "Real shapes".
export MAX_PIXELS="${MAX_PIXELS:-401408}" MIN_PIXELS="${MIN_PIXELS:-3136}"
LORA_RANK="${LORA_RANK:-8}"
LORA_ALPHA="${LORA_ALPHA:-32}"
TORCH_DTYPE="${TORCH_DTYPE:-bfloat16}"
MAX_STEPS="${MAX_STEPS:--1}"
SAVE_STEPS="${SAVE_STEPS:-500}"
LOGGING_STEPS="${LOGGING_STEPS:-5}"
DEEPSPEED="${DEEPSPEED-zero2}"  # "" for plain DDP
DATALOADER_WORKERS="${DATALOADER_WORKERS:-4}"
SEED="${SEED:-42}"

[ -d "$MODEL" ] || export HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0
if [ "$NPROC_PER_NODE" -gt 1 ]; then export NPROC_PER_NODE; else unset NPROC_PER_NODE; fi
[ -n "${CUDA_VISIBLE_DEVICES:-}" ] && export CUDA_VISIBLE_DEVICES

args=(
  --rlhf_type dpo --beta "$BETA"
  --model "$MODEL" --model_type qwen2_5_vl --template qwen2_5_vl --use_hf true --check_model false
  --dataset "$DATASET" --output_dir "$OUTPUT_DIR" --add_version false
  --tuner_type lora --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --target_modules all-linear --freeze_vit true
  --torch_dtype "$TORCH_DTYPE" --num_train_epochs "$NUM_TRAIN_EPOCHS" --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACC"
  --learning_rate "$LEARNING_RATE" --warmup_ratio 0.05 --max_length "$MAX_LENGTH"
  --save_steps "$SAVE_STEPS" --save_total_limit 2 --logging_steps "$LOGGING_STEPS"
  --dataloader_num_workers "$DATALOADER_WORKERS" --seed "$SEED" --report_to "${REPORT_TO:-tensorboard}"
)
[ -n "$DEEPSPEED" ] && args+=(--deepspeed "$DEEPSPEED")
[ -f "$MODEL/swift_plugin.py" ] && args+=(--external_plugins "$MODEL/swift_plugin.py")
echo "DPO (published recipe): $MODEL on $DATASET -> $OUTPUT_DIR"
swift rlhf "${args[@]}" ${EXTRA_ARGS:-} "$@"
last="$(ls -d "$OUTPUT_DIR"/checkpoint-* 2>/dev/null | sort -V | tail -n 1)"
[ -n "$last" ] || { echo "DPO: no checkpoint in $OUTPUT_DIR" >&2; exit 1; }
ln -sfn "$(basename "$last")" "$OUTPUT_DIR/last"
echo "DPO adapter: $OUTPUT_DIR/last -> $last"
