#!/usr/bin/env bash
# Install (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# lint first: a style error fails CI like a failing test (ruff is pinned in constraints.txt)
"$ROOT/.venv/bin/ruff" check "$ROOT"
"$ROOT/.venv/bin/ruff" format --check "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
