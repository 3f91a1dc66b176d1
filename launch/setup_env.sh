#!/usr/bin/env bash
# Create/refresh .venv from uv.lock: Python 3.12, torch 2.13.0, megatron-core 0.19.2, vLLM (CPU build), tests.
# Usage: bash launch/setup_env.sh            (CPU development / CI)
# The GPU stack (vllm CUDA build, transformer-engine, apex) comes from the Docker image instead.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
    local candidates=(python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
    fi
    candidates+=("$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12)
    for py in "${candidates[@]}"; do
        # A pyenv shim exists on PATH but fails unless that version is active: run it, don't just find it.
        if "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
            command -v "$py" 2>/dev/null || echo "$py"
            return 0
        fi
    done
    return 1
}

PY=$(find_python312) || {
    echo "error: Python 3.12 is required (megatron-core >= 0.17 needs it) and none was found." >&2
    echo "  fix: install it, e.g. 'pyenv install 3.12' or 'apt-get install python3.12 python3.12-venv'," >&2
    echo "       or put a working python3.12 on PATH." >&2
    exit 1
}
echo "setup: using $PY ($("$PY" --version))"

UV=$(command -v uv || true)
if [ -z "$UV" ]; then
    if [ ! -x .uv-bootstrap/bin/uv ]; then
        echo "setup: installing uv into .uv-bootstrap (from PyPI)"
        "$PY" -m venv .uv-bootstrap
        .uv-bootstrap/bin/pip install --quiet "uv==0.13.9"
    fi
    UV=.uv-bootstrap/bin/uv
fi

export UV_PYTHON_DOWNLOADS=never  # no Python downloads here; use the interpreter found above
start=$(date +%s)
# --compile-bytecode: every spawned rank, vLLM engine and reward worker imports torch, megatron-core and vLLM;
# without .pyc files (uv writes none by default, and PYTHONDONTWRITEBYTECODE stops Python writing them) each
# import compiles them again: 37 s instead of 15 s for torch+megatron-core+transformers on 2 CPU cores.
"$UV" sync --frozen --compile-bytecode --python "$PY" --extra cpu --extra test
echo "setup: environment ready in $(( $(date +%s) - start ))s (.venv)"
