#!/usr/bin/env bash
# The whole test suite (unit + integration on tiny models; offline). Installs first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -q --timeout=900 "$@"
