#!/usr/bin/env bash
# Create or update .venv at the repository root from the lock (constraints.txt).
# Idempotent: when pyproject.toml and constraints.txt are unchanged since the last run it returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.apo-setup.sha256"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/apo" ]; then
  exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
# One resolve against the lock: two machines get the same versions.
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
# METEOR and the PTB tokenizer of pycocoevalcap run on Java; say so if it is absent (metrics then skip METEOR).
command -v java >/dev/null 2>&1 || echo "setup: java not found: METEOR will be skipped (apt-get install default-jre-headless)" >&2
echo "$want" > "$STAMP"
echo "setup: .venv ready in $(( $(date +%s) - t0 )) s"
