#!/usr/bin/env bash
# Stages 2-3, "compare" and "critique": consensus t+ (if absent) -> preference groups -> APO training.
# Defaults are the paper's 7B recipe (configs/apo/paper.yaml); every one is an environment variable.
#
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct SFT_ADAPTER=runs/sft/last DATASET=cxrmax_train.jsonl IMAGE_ROOT=mimic-cxr-jpg \
#   NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 bash scripts/APO-Qwen2.5.sh
#
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun / ms-swift.
# Extra `apo train` overrides go after the script name (e.g. --max_steps 100) or in EXTRA_ARGS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"

MODEL="${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}"
SFT_ADAPTER="${SFT_ADAPTER-$ROOT/runs/sft/last}"   # "" when MODEL is already the merged SFT model
DATASET="${DATASET:-$ROOT/runs/cxrmax/cxrmax_train.jsonl}"
IMAGE_ROOT="${IMAGE_ROOT:-}"
WORK_DIR="${WORK_DIR:-$ROOT/runs/apo}"
CONSENSUS="${CONSENSUS:-$WORK_DIR/consensus.jsonl}"
GROUPS_FILE="${GROUPS_FILE:-$WORK_DIR/groups.jsonl}"
PAIRS="${PAIRS:-$WORK_DIR/dpo_pairs.jsonl}"
OUTPUT_DIR="${OUTPUT_DIR:-$WORK_DIR/model}"
CONFIG="${CONFIG:-$ROOT/configs/apo/paper.yaml}"
STRATEGY="${STRATEGY:-model}"          # model (the paper's), self-vote (pi_st's own sample closest to the
                                       # teachers; SELF_VOTE_SAMPLES, SELF_VOTE_SEED) or vote (medoid teacher)
SELF_VOTE_SAMPLES="${SELF_VOTE_SAMPLES:-8}"
SELF_VOTE_SEED="${SELF_VOTE_SEED:-0}"
case "$STRATEGY" in
  model|self-vote|vote) ;;
  *) echo "APO: STRATEGY=$STRATEGY: expected model, self-vote or vote" >&2; exit 2 ;;
esac
NEGATIVES="${NEGATIVES:-all}"          # all or conflicting
CONSENSUS_BATCH="${CONSENSUS_BATCH:-8}"
CONSENSUS_MAX_NEW_TOKENS="${CONSENSUS_MAX_NEW_TOKENS:-512}"
CONSENSUS_MAX_LENGTH="${CONSENSUS_MAX_LENGTH:-4096}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED-$ROOT/configs/deepspeed/zero2.json}"   # set to "" for plain DDP
SKIP_BAD="${SKIP_BAD:-}"               # non-empty: --skip-bad for the data stages
# The pixel budget pi_st was trained with (scripts/SFT-Qwen2.5.sh's; its pixel_budget.json is checked).
export MAX_PIXELS="${MAX_PIXELS:-401408}" MIN_PIXELS="${MIN_PIXELS:-3136}"
APO_MAX_LENGTH="${APO_MAX_LENGTH:-4096}"  # configs/apo/paper.yaml's max_length, for the audit
AUDIT="${AUDIT:-1}"                    # 0: skip the pre-flight `apo audit`
MAX_LOSS="${MAX_LOSS:-0}"

[ -d "$MODEL" ] || export HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0
[ -n "${CUDA_VISIBLE_DEVICES:-}" ] && export CUDA_VISIBLE_DEVICES
mkdir -p "$WORK_DIR"
data_args=(--dataset "$DATASET")
[ -n "$IMAGE_ROOT" ] && data_args+=(--image-root "$IMAGE_ROOT")
[ -n "$SKIP_BAD" ] && data_args+=(--skip-bad)
launch=(torchrun --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
# DeepSpeed needs the torchrun environment even for one process.
(( NPROC_PER_NODE * NNODES > 1 )) || [ -n "$DEEPSPEED" ] || launch=(python)

pixel_args=(--max-pixels "$MAX_PIXELS" --min-pixels "$MIN_PIXELS")
if [ "$AUDIT" != 0 ] && [ -d "$MODEL" ]; then
  apo audit --model "$MODEL" "${data_args[@]}" --stages consensus,apo --consensus-max-length "$CONSENSUS_MAX_LENGTH" \
    --max-new-tokens "$CONSENSUS_MAX_NEW_TOKENS" --apo-max-length "$APO_MAX_LENGTH" --max-loss "$MAX_LOSS" \
    --gpus "$(( NPROC_PER_NODE * NNODES ))" --verify-images header "${pixel_args[@]}" \
    || { echo "APO: the audit says cases would be lost (AUDIT=0 skips it)" >&2; exit 1; }
fi

# Stage 2. Resumable: a rerun skips the cases already written.
adapter_args=()
[ -e "$SFT_ADAPTER" ] && adapter_args=(--adapter "$SFT_ADAPTER")
if [ "$STRATEGY" = vote ]; then
  apo consensus --strategy vote "${data_args[@]}" --out "$CONSENSUS"
elif [ "$STRATEGY" = self-vote ]; then
  "${launch[@]}" -m apo.cli consensus --strategy self-vote --model "$MODEL" "${adapter_args[@]}" "${data_args[@]}" \
    --out "$CONSENSUS" --batch-size "$CONSENSUS_BATCH" --max-new-tokens "$CONSENSUS_MAX_NEW_TOKENS" \
    --num-samples "$SELF_VOTE_SAMPLES" --seed "$SELF_VOTE_SEED" "${pixel_args[@]}"
else
  "${launch[@]}" -m apo.cli consensus --strategy model --model "$MODEL" "${adapter_args[@]}" "${data_args[@]}" \
    --out "$CONSENSUS" --batch-size "$CONSENSUS_BATCH" --max-new-tokens "$CONSENSUS_MAX_NEW_TOKENS" \
    --max-length "$CONSENSUS_MAX_LENGTH" "${pixel_args[@]}"
fi

# Preference groups {t+, teacher negatives}, and the pairwise rows of the published DPO recipe (baseline).
apo build-pairs "${data_args[@]}" --consensus "$CONSENSUS" --negatives "$NEGATIVES" --out "$GROUPS_FILE" --dpo-out "$PAIRS"

# Stage 3.
# --resume: a rerun after a kill continues from the newest complete checkpoint (from scratch when there is none).
train_args=(--config "$CONFIG" --model_name_or_path "$MODEL" --groups_file "$GROUPS_FILE" --output_dir "$OUTPUT_DIR" --resume
            --max_pixels "$MAX_PIXELS" --min_pixels "$MIN_PIXELS")
[ -e "$SFT_ADAPTER" ] && train_args+=(--adapter_name_or_path "$SFT_ADAPTER")
[ -n "$DEEPSPEED" ] && train_args+=(--deepspeed "$DEEPSPEED")
"${launch[@]}" -m apo.cli train "${train_args[@]}" ${EXTRA_ARGS:-} "$@"
echo "APO model: $OUTPUT_DIR"
