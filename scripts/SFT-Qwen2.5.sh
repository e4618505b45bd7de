#!/usr/bin/env bash
# Stage 1, "learn": LoRA SFT of the student on every teacher's trajectory, through ms-swift.
# Defaults are the paper's 7B recipe (arXiv 2510.04142; README, "The command line"); every one is an environment variable.
#
#   DATASET=runs/cxrmax/sft.jsonl NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 bash scripts/SFT-Qwen2.5.sh
#
# DATASET is what `apo prepare-sft` writes; several files, separated by spaces, are mixed (ms-swift's --dataset takes
# a list: e.g. rehearsal rows from `apo replay`, or a hub dataset with #N rows; in a list, no path may hold a space).
# The adapter of the last step is linked at $OUTPUT_DIR/last.
# Anything in EXTRA_ARGS (or after the script name) goes to `swift sft` unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"

MODEL="${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}"
DATASET="${DATASET:-$ROOT/runs/cxrmax/sft.jsonl}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/runs/sft}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
LEARNING_RATE="${LEARNING_RATE:-1e-4}"
NUM_TRAIN_EPOCHS="${NUM_TRAIN_EPOCHS:-1}"
BATCH_SIZE="${BATCH_SIZE:-2}"
GRAD_ACC="${GRAD_ACC:-$(( 16 / NPROC_PER_NODE > 0 ? 16 / NPROC_PER_NODE : 1 ))}"
MAX_LENGTH="${MAX_LENGTH:-2304}"
LORA_RANK="${LORA_RANK:-8}"
LORA_ALPHA="${LORA_ALPHA:-32}"
WARMUP_RATIO="${WARMUP_RATIO:-0.05}"
TORCH_DTYPE="${TORCH_DTYPE:-bfloat16}"
MAX_STEPS="${MAX_STEPS:--1}"
SAVE_STEPS="${SAVE_STEPS:-500}"
LOGGING_STEPS="${LOGGING_STEPS:-5}"
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-true}"
DATALOADER_WORKERS="${DATALOADER_WORKERS:-4}"
DEEPSPEED="${DEEPSPEED:-}"  # e.g. zero2 (ms-swift's name) or a JSON path; empty = plain DDP
SEED="${SEED:-42}"
MODULES_TO_SAVE="${MODULES_TO_SAVE:-}"  # e.g. "embed_tokens lm_head": trained in full beside LoRA (random-init models)
MERGE_LORA="${MERGE_LORA:-false}"  # true: also write base+adapter merged to $OUTPUT_DIR/merged (pi_st as one model)
# The pixel budget, the same in every stage (README "Real shapes"): ms-swift reads MAX_PIXELS / MIN_PIXELS through
# qwen-vl-utils. 401,408 = 512 x 28 x 28: a 2,544 x 3,056 MIMIC image -> 480 image tokens (unset, ~9,900: every row
# over --max_length 2304, and ms-swift's truncation_strategy `delete` drops them all without an error).
export MAX_PIXELS="${MAX_PIXELS:-401408}" MIN_PIXELS="${MIN_PIXELS:-3136}"
AUDIT="${AUDIT:-1}"  # 0: skip the pre-flight `apo audit` (lengths under the budget; stops if rows would be dropped)
MAX_LOSS="${MAX_LOSS:-0}"  # fraction of rows the audit lets ms-swift drop

# A local folder stays offline; a hub id is the user's explicit request to download it.
[ -d "$MODEL" ] || export HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0
# ms-swift starts torchrun whenever NPROC_PER_NODE is set; one process needs none of that.
if [ "$NPROC_PER_NODE" -gt 1 ]; then export NPROC_PER_NODE; else unset NPROC_PER_NODE; fi
[ -n "${CUDA_VISIBLE_DEVICES:-}" ] && export CUDA_VISIBLE_DEVICES

# one existing path (spaces and all) is one dataset; anything else is a space-separated list
if [ -e "$DATASET" ]; then DATASETS=("$DATASET"); else read -ra DATASETS <<< "$DATASET"; fi
args=(
  --model "$MODEL" --model_type qwen2_5_vl --template qwen2_5_vl --use_hf true --check_model false
  --dataset "${DATASETS[@]}" --output_dir "$OUTPUT_DIR" --add_version false
  --tuner_type lora --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --target_modules all-linear --freeze_vit true
  --torch_dtype "$TORCH_DTYPE" --num_train_epochs "$NUM_TRAIN_EPOCHS" --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACC"
  --learning_rate "$LEARNING_RATE" --warmup_ratio "$WARMUP_RATIO" --max_length "$MAX_LENGTH"
  --gradient_checkpointing "$GRADIENT_CHECKPOINTING" --save_steps "$SAVE_STEPS" --save_total_limit 2
  --logging_steps "$LOGGING_STEPS" --dataloader_num_workers "$DATALOADER_WORKERS" --seed "$SEED"
  --report_to "${REPORT_TO:-tensorboard}"
)
[ -n "$DEEPSPEED" ] && args+=(--deepspeed "$DEEPSPEED")
[ -n "$MODULES_TO_SAVE" ] && args+=(--modules_to_save $MODULES_TO_SAVE)
# `apo tiny-model` ships an ms-swift plugin (image-token ids of its small vocabulary); a real Qwen2.5-VL has none.
PLUGIN="$MODEL/swift_plugin.py"
[ -f "$PLUGIN" ] && args+=(--external_plugins "$PLUGIN")
# ms-swift rows name their images by absolute path (prepare-sft writes them so), hence --allow-absolute-paths
if [ "$AUDIT" != 0 ] && [ -d "$MODEL" ]; then
  for data in "${DATASETS[@]}"; do
    [ -f "$data" ] || continue  # a hub dataset name: nothing local to audit
    apo audit --model "$MODEL" --dataset "$data" --stages sft --sft-max-length "$MAX_LENGTH" \
      --max-loss "$MAX_LOSS" --verify-images header --allow-absolute-paths \
      || { echo "SFT: the audit says rows of $data would be lost (AUDIT=0 skips it)" >&2; exit 1; }
  done
fi
echo "SFT: $MODEL on $DATASET -> $OUTPUT_DIR (pixels $MIN_PIXELS..$MAX_PIXELS) (NPROC_PER_NODE=${NPROC_PER_NODE:-1}, grad-acc $GRAD_ACC)"
swift sft "${args[@]}" ${EXTRA_ARGS:-} "$@"
# $OUTPUT_DIR/last -> the newest checkpoint (ms-swift's own symlink option fails when nothing was evaluated).
last="$(ls -d "$OUTPUT_DIR"/checkpoint-* 2>/dev/null | sort -V | tail -n 1)"
[ -n "$last" ] || { echo "SFT: no checkpoint in $OUTPUT_DIR" >&2; exit 1; }
ln -sfn "$(basename "$last")" "$OUTPUT_DIR/last"
# pi_st's pixel budget: later stages (consensus, train, eval) refuse another one
printf '{"max_pixels": %d, "min_pixels": %d}\n' "$MAX_PIXELS" "$MIN_PIXELS" > "$OUTPUT_DIR/pixel_budget.json"
echo "SFT adapter: $OUTPUT_DIR/last -> $last"
if [ "$MERGE_LORA" = true ]; then
  swift export --adapters "$OUTPUT_DIR/last" --merge_lora true --output_dir "$OUTPUT_DIR/merged" --exist_ok true \
    --model_type qwen2_5_vl --template qwen2_5_vl --use_hf true
  [ -f "$PLUGIN" ] && cp "$PLUGIN" "$OUTPUT_DIR/merged/"
  cp "$OUTPUT_DIR/pixel_budget.json" "$OUTPUT_DIR/merged/"
  echo "SFT model (merged): $OUTPUT_DIR/merged"
fi
