#!/usr/bin/env bash
# The GPU checks of the performance work in one device call: 7B-shape APO step (packed vs plain vs pairwise, MFU),
# a DeepSpeed ZeRO-2 bf16 APO run, and consensus generation batched vs per-case loop. Everything lands in $OUT.
#
#   bash benchmarks/gpu_checks.sh prepare       # here, with the package registry: the wheels the GPU image lacks
#                                               # -> .whl/ (add `/.whl/` to .git/info/exclude; carry it)
#   bash benchmarks/gpu_checks.sh run           # on the GPU machine (device `run`, carry [".whl"]): installs the
#                                               # wheels offline, runs the checks, writes $OUT/*.txt
#   DEVICE=cpu bash benchmarks/gpu_checks.sh run   # the same plumbing on CPU at tiny sizes (checks this script)
#
# The GPU image (device/KINDS.md) has Python 3.12, torch 2.11, transformers 5.17, peft, accelerate, but not
# transformers 5.19 (Qwen2.5-VL `mm_encoder_outputs`, used by the packed step), deepspeed, datasets or pydantic.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
pin() { grep -i "^$1==" constraints.txt | head -1; }
BINARY=(transformers peft datasets dill multiprocess hjson pydantic pydantic_core annotated-types typing-inspection)

case "${1:-}" in
prepare)
  mkdir -p .whl
  specs=(); for p in "${BINARY[@]}"; do specs+=("$(pin "$p")"); done
  .venv/bin/python -m pip download -q --dest .whl --no-deps --only-binary=:all: --implementation cp \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 "${specs[@]}"
  # deepspeed is a source release: a pure-Python wheel (its CUDA ops build just in time on the GPU)
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
  ls -la .whl; du -sh .whl
  ;;
run)
  DEVICE="${DEVICE:-cuda}"
  OUT="${OUT:-$ROOT/gpu_out}"
  W="$(mktemp -d)"
  mkdir -p "$OUT"
  PY=python3
  if [ "$DEVICE" = cuda ]; then
    $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -3
  else
    PY="$ROOT/.venv/bin/python"; export DS_ACCELERATOR=cpu
  fi
  export PYTHONPATH="$ROOT" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  log() { printf '\n== %s\n' "$*"; }
  { $PY -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"
    [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  } > "$OUT/versions.txt" 2>&1

  # 1. the APO step with 7B shapes (random bf16 weights, LoRA): packed vs plain vs pairwise DPO; MFU
  if [ "$DEVICE" = cuda ]; then
    log "7B, 1 group/step, --check" | tee "$OUT/bench_7b.txt"
    $PY benchmarks/bench_apo.py --device cuda --model-config 7b --methods apo,plain,pairs --steps 6 --warmup 2 \
      --check --image-size 448 --work "$W/b1" >> "$OUT/bench_7b.txt" 2>&1 || echo "rc=$?" >> "$OUT/bench_7b.txt"
    for extra in "--groups-per-step 4" "--groups-per-step 4 --no-grad-ckpt"; do
      log "7B apo $extra" >> "$OUT/bench_7b.txt"
      $PY benchmarks/bench_apo.py --device cuda --model-config 7b --methods apo --steps 6 --warmup 2 \
        --image-size 448 $extra --work "$W/b2" >> "$OUT/bench_7b.txt" 2>&1 || echo "rc=$?" >> "$OUT/bench_7b.txt"
    done
  else
    $PY benchmarks/bench_apo.py --methods apo,plain --steps 2 --warmup 1 --check --work "$W/b1" \
      > "$OUT/bench_7b.txt" 2>&1 || echo "rc=$?" >> "$OUT/bench_7b.txt"
  fi
  tail -1 "$OUT/bench_7b.txt"

  # 2. DeepSpeed ZeRO-2 (bf16 on GPU), the launcher's default, on the tiny model: one process, a few steps
  $PY -m apo.cli tiny-model --out "$W/tiny" > /dev/null
  $PY - "$W" <<'EOF'
import json, sys
from pathlib import Path
from benchmarks.bench_apo import make_data
w = Path(sys.argv[1])
make_data(w / "data", 32, 7, 112)
rows = []  # the same cases as CXR-MAX-format wide rows, for the consensus benchmark
for line in open(w / "data" / "groups.jsonl"):
    g = json.loads(line)
    rows.append({"case_id": g["case_id"], "image": "images/" + Path(g["images"][0]).name, "question": g["prompt"],
                 "trajectories": dict(zip(g["teachers"], g["negatives"]))})
(w / "data" / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
EOF
  if [ "$DEVICE" = cuda ]; then DT=(--use_cpu false --bf16 true --torch_dtype bfloat16); else DT=(--use_cpu true); fi
  log "DeepSpeed ZeRO-2, $DEVICE" > "$OUT/zero2.txt"
  $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m apo.cli train --config configs/apo/demo.yaml \
    --model_name_or_path "$W/tiny" --groups_file "$W/data/groups.jsonl" --output_dir "$W/zero2" --max_steps 5 \
    --merge_on_save false --deepspeed configs/deepspeed/zero2.json "${DT[@]}" >> "$OUT/zero2.txt" 2>&1 \
    || echo "rc=$?" >> "$OUT/zero2.txt"
  grep -E "apo train:|rc=|Error" "$OUT/zero2.txt" | tail -3

  # 3. consensus generation: batched (sorted) vs unsorted vs a per-case loop, tiny model; apo.model.decoding (CPU-only by
  # default) forced on, against transformers' defaults: same texts and its speed on a GPU
  $PY benchmarks/bench_consensus.py --device "$DEVICE" --model-dir "$W/tiny" --dataset "$W/data/cases.jsonl" --fast on \
    --cases 32 --max-new-tokens "$([ "$DEVICE" = cuda ] && echo 256 || echo 16)" --work "$W/c" \
    > "$OUT/consensus.txt" 2>&1 || echo "rc=$?" >> "$OUT/consensus.txt"
  tail -1 "$OUT/consensus.txt"
  ;;
*)
  sed -n 2,12p "$0"; exit 2
  ;;
esac
