#!/usr/bin/env bash
# Evaluation on real data: MIMIC-CXR report generation and MS-CXR-T temporal classification for one model, then the
# paper's tables over every run evaluated into $RESULTS_DIR so far. Run it once per model (base, sft, dpo, apo, ...):
#
#   NAME=apo MODEL=runs/sft/merged ADAPTER=runs/apo/model DATASET=mimic_test.jsonl IMAGE_ROOT=/data/mimic-cxr-jpg \
#   REPORTS_DIR=/data/mimic-cxr-reports MSCXRT_CSV=/data/ms-cxr-t/MS_CXR_T_temporal_image_classification_v1.0.0.csv \
#   bash scripts/eval.sh
#
# DATASET: the test cases (any layout `apo` reads; a `report` field, or REPORTS_DIR with MIMIC-CXR's
# files/pXX/pXXXXXXXX/sXXXXXXXX.txt, gives the references). Leave DATASET or MSCXRT_CSV empty to skip that benchmark.
# Multi-GPU: NPROC_PER_NODE=4 shards the cases over 4 processes (torchrun); results are merged by rank 0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"

NAME="${NAME:?set NAME, the run's name in the tables (e.g. base, sft, dpo, apo)}"
MODEL="${MODEL:?set MODEL, the model folder (or a hub id)}"
ADAPTER="${ADAPTER:-}"
DATASET="${DATASET:-}"
IMAGE_ROOT="${IMAGE_ROOT:-}"
REPORTS_DIR="${REPORTS_DIR:-}"
MSCXRT_CSV="${MSCXRT_CSV:-}"
MSCXRT_IMAGE_ROOT="${MSCXRT_IMAGE_ROOT:-$IMAGE_ROOT}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/results}"
BATCH_SIZE="${BATCH_SIZE:-16}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-512}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
# The pixel budget the model was trained with (checked against pixel_budget.json next to MODEL / ADAPTER).
export MAX_PIXELS="${MAX_PIXELS:-401408}" MIN_PIXELS="${MIN_PIXELS:-3136}"

[ -d "$MODEL" ] || export HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0
launch=(python)
(( NPROC_PER_NODE > 1 )) && launch=(torchrun --nproc_per_node "$NPROC_PER_NODE")
model_args=(--model "$MODEL" --batch-size "$BATCH_SIZE" --max-pixels "$MAX_PIXELS" --min-pixels "$MIN_PIXELS")
[ -n "$ADAPTER" ] && model_args+=(--adapter "$ADAPTER")
out="$RESULTS_DIR/$NAME"

if [ -n "$DATASET" ]; then
  extra=()
  [ -n "$IMAGE_ROOT" ] && extra+=(--image-root "$IMAGE_ROOT")
  [ -n "$REPORTS_DIR" ] && extra+=(--reports-dir "$REPORTS_DIR")
  "${launch[@]}" -m apo.cli eval-report "${model_args[@]}" --dataset "$DATASET" "${extra[@]}" --out "$out" \
    --max-new-tokens "$MAX_NEW_TOKENS"
fi
if [ -n "$MSCXRT_CSV" ]; then
  "${launch[@]}" -m apo.cli eval-mscxrt "${model_args[@]}" --csv "$MSCXRT_CSV" --image-root "$MSCXRT_IMAGE_ROOT" \
    --out "$out"
fi
apo tables --results "$RESULTS_DIR" --out "$RESULTS_DIR"
