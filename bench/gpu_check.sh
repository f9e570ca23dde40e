#!/usr/bin/env bash
# The prepared GPU check: one command, offline, under 8 minutes on one H100/H200.
#
#   bench/gpu_check.sh --fetch-wheels [DIR]   here, on a machine with PyPI: download the wheels the GPU machine
#                                             lacks into DIR (default bench/wheels, git-ignored), build
#                                             DeepSpeed's, print the sizes (at most 64 MiB in all)
#   bench/gpu_check.sh [--wheels DIR]         there: make a venv on top of the machine's Python (its CUDA
#                                             torch stays), install from DIR what is missing, install
#                                             chatrlhf (-e), run tests/gpu and the throughput table
#   bench/gpu_check.sh --install-only [--wheels DIR]   only make and fill the venv (any machine), e.g. to run
#                                             single tests there with $GPU_CHECK_VENV/bin/python -m pytest
#
# On a machine without CUDA the second form is a dry run: versions, the wheels and which ones this
# environment would install, the imports, and pytest's collection of tests/gpu; it exits 0.
# Environment: PYTHON (the base interpreter; default python3, else .venv/bin/python where python3 has no
# torch), GPU_CHECK_VENV (default /tmp/chatrlhf-gpu-venv). The device runner is given the wheels with
# carry=["bench/wheels"]; see bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
WHEELS=bench/wheels
VENV=${GPU_CHECK_VENV:-/tmp/chatrlhf-gpu-venv}
TEST_TIMEOUT_S=270  # with the set-up (~20 s) and the throughput table: under 8 minutes in all
BENCH_TIMEOUT_S=180

section() { printf '\n==== %s (%ss)\n' "$1" "$(($(date +%s) - START))"; }

base_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if python3 -c "import torch" 2>/dev/null; then echo python3; return; fi
    if [[ -x .venv/bin/python ]]; then echo .venv/bin/python; return; fi
    echo python3
}

INSTALL_ONLY=0
while (($#)); do
    case "$1" in
        --fetch-wheels)
            exec "${PYTHON:-.venv/bin/python}" bench/gpu_wheels.py fetch "${2:-$WHEELS}" ;;
        --wheels)
            WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --install-only)
            INSTALL_ONLY=1; shift ;;
        *)
            echo "usage: bench/gpu_check.sh [--fetch-wheels [DIR] | [--install-only] [--wheels DIR]]" >&2; exit 2 ;;
    esac
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BASE=$(base_python)

section "machine"
nvidia-smi 2>/dev/null || echo "nvidia-smi: not found (no NVIDIA driver here)"
"$BASE" - <<'PY'
import platform, sys
import torch
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
PY
CUDA=$("$BASE" -c "import torch; print(int(torch.cuda.is_available()))")

section "venv $VENV on top of $BASE"
# --without-pip: pip comes from the base environment (ensurepip may be missing there). A venv made from
# a venv sees the *base interpreter's* site-packages, not its parent venv's, where the GPU image keeps
# torch: a .pth file adds the parent's site dirs (with their own .pth files) after the venv's own.
"$BASE" -m venv --clear --without-pip --system-site-packages "$VENV" || exit 1
"$BASE" - "$VENV" <<'PY'
import site, subprocess, sys
from pathlib import Path
venv = Path(sys.argv[1])
if sys.prefix != sys.base_prefix:
    purelib = subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                       "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    (Path(purelib.strip()) / "_parent_env.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    print(f"parent environment {sys.prefix}: {', '.join(dirs)}")
PY
PY=$VENV/bin/python
"$PY" -c "import torch, pip; print(f'venv sees torch {torch.__version__} at {torch.__file__}, pip {pip.__version__}')" || exit 1

if [[ "$CUDA" != 1 && "$INSTALL_ONLY" != 1 ]]; then
    section "dry run: no CUDA device"
    "$PY" bench/gpu_wheels.py sizes "$WHEELS"
    "$PY" bench/gpu_wheels.py plan "$WHEELS"
    "$PY" -c "import chatrlhf, deepspeed, jsonargparse, transformers, peft, accelerate, pytest; print('imports ok: chatrlhf, deepspeed', deepspeed.__version__, 'jsonargparse', jsonargparse.__version__, 'transformers', transformers.__version__)" || exit 1
    "$PY" -m pytest --collect-only -q tests/gpu || exit 1
    section "dry run done, total wall time $(($(date +%s) - START)) s"
    exit 0
fi

section "install the missing wheels from $WHEELS"
"$PY" bench/gpu_wheels.py install "$WHEELS" || exit 1
if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation --quiet -e .; then
    echo "editable install failed: putting src/ on the venv's path instead"
    "$PY" -c "import pathlib, sys, sysconfig; (pathlib.Path(sysconfig.get_paths()['purelib']) / 'chatrlhf_src.pth').write_text(sys.argv[1] + '\n')" "$PWD/src"
fi
"$PY" -c "import chatrlhf, deepspeed, jsonargparse, transformers; print('chatrlhf from', chatrlhf.__file__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" || exit 1

if [[ "$INSTALL_ONLY" == 1 ]]; then
    section "venv ready at $VENV, total wall time $(($(date +%s) - START)) s"
    exit 0
fi

FAILED=()
section "pytest tests/gpu"
timeout "$TEST_TIMEOUT_S" "$PY" -m pytest -v -rs -p no:cacheprovider tests/gpu || FAILED+=("tests/gpu")

section "generation throughput (bf16, random SmolLM2-135M-shaped Llama)"
timeout "$BENCH_TIMEOUT_S" "$PY" bench/gpu_throughput.py || FAILED+=("bench/gpu_throughput.py")

section "done, total wall time $(($(date +%s) - START)) s"
if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all GPU checks passed"
