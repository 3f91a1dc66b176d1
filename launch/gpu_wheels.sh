#!/usr/bin/env bash
# make gpu-wheels: dist/gpu-wheels/, what launch/gpu_train_smoke.py needs on a GPU machine that has Python 3.12 with
# torch and CUDA only (no vLLM, no Transformer Engine, no index): this package, megatron-core and the packages the
# training job imports that torch does not bring, at uv.lock's versions, wheels for CPython 3.12 x86_64 Linux.
# Refuses a set over 64 MiB (what travels to such a machine). There:
#   pip install --no-deps --no-index dist/gpu-wheels/*.whl && python launch/gpu_train_smoke.py
set -euo pipefail
cd "$(dirname "$0")/.."
UV=$(command -v uv || echo .uv-bootstrap/bin/uv)
PYTHON=${PYTHON:-.venv/bin/python}
OUT=dist/gpu-wheels
LIMIT_MIB=64
# Imported by the job on its training-only path (tokenizer, config, data, metrics, the closing plot); torch's own
# requirements (filelock, fsspec, jinja2, networkx, sympy, typing-extensions, setuptools) are not repeated. Optional
# imports (wandb without --wandb-project, math-verify for the arithmetic reward, pyarrow for parquet data) stay out.
PACKAGES=(megatron-core numpy packaging pyyaml tqdm psutil einops
          transformers tokenizers huggingface-hub safetensors regex
          requests urllib3 idna certifi charset-normalizer httpx2 httpcore2 h11 anyio sniffio truststore
          matplotlib pillow fonttools kiwisolver cycler pyparsing python-dateutil six contourpy)
rm -rf "$OUT" && mkdir -p "$OUT"
"$UV" build --wheel --out-dir "$OUT" --quiet . >/dev/null
pins=$("$PYTHON" - "${PACKAGES[@]}" <<'PY'
import sys, tomllib
versions = {}
for p in tomllib.load(open("uv.lock", "rb"))["package"]:
    versions.setdefault(p["name"], p["version"])
missing = [n for n in sys.argv[1:] if n not in versions]
if missing:
    sys.exit(f"not in uv.lock: {missing}")
print(" ".join(f"{n}=={versions[n]}" for n in sys.argv[1:]))
PY
)
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download --isolated --quiet --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --dest "$OUT" $pins
size=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
count=$(find "$OUT" -name '*.whl' | wc -l)
if [ "$size" -gt $(( LIMIT_MIB * 1024 * 1024 )) ]; then
    echo "error: $OUT holds $count wheels, $(( size / 1024 / 1024 )) MiB: over the ${LIMIT_MIB} MiB that travel" >&2
    exit 1
fi
echo "gpu-wheels: $count wheels in $OUT, $(( size / 1024 / 1024 )) MiB (limit ${LIMIT_MIB} MiB)"
