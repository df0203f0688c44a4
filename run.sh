#!/usr/bin/env bash
# The two set-up commands of the README:  bash run.sh demo  |  bash run.sh test
# Each installs what it needs first, then runs. PYTHON picks the interpreter (default: python3 on PATH);
# PIP_CONSTRAINT=constraints.txt installs the versions the suite last passed with.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

install() {
    # Keep a torch that is already installed (a user's CUDA build, our GPU machines' 2.11); otherwise
    # take 2.13.0, which pip resolves offline to a CPU wheel on our machines. A loose requirement
    # here would pull a multi-GB CUDA build.
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        "$PYTHON" -m pip install -q "torch==2.13.0"
    fi
    "$PYTHON" -m pip install -q -e ".[dev,export]"
    # What pip resolved: the versions a report of a failure needs.
    "$PYTHON" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
names = ["torch", "triton", "diffusers", "transformers", "kernels", "accelerate", "peft", "onnx", "onnxruntime", "tdm-fast"]
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"
print("resolved: " + ", ".join(f"{name} {installed(name)}" for name in names), flush=True)
PY
}

case "${1:-}" in
    demo)
        install
        shift
        exec "$PYTHON" -m tdm_fast demo "$@"
        ;;
    test)
        install
        shift
        # pytest exits 5 when it collects nothing: set -e turns that into a failure too. One worker per core
        # (at most 4), each test file on one worker so that its fixtures are built once; the slowest tests
        # are listed so that the suite's time budget (15 minutes on 2 cores) stays visible.
        exec "$PYTHON" -m pytest tests -q -n auto --maxprocesses 4 --dist loadfile --durations=15 "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test [extra arguments]" >&2
        exit 2
        ;;
esac
