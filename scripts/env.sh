# Sourced by the launchers: offline by default, quiet tokenizers, no telemetry.
# A user who wants a hub model unsets HF_HUB_OFFLINE / MODELSCOPE_OFFLINE (and passes a hub id).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-$HF_HUB_OFFLINE}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-$HF_HUB_OFFLINE}"
export MODELSCOPE_OFFLINE="${MODELSCOPE_OFFLINE:-1}"
export USE_HF="${USE_HF:-1}"  # ms-swift: resolve model and dataset ids on the HF hub, not ModelScope
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export HF_HUB_DISABLE_TELEMETRY=1
export PYTHONUNBUFFERED=1
_apo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_apo_root/.venv/bin:$PATH"
