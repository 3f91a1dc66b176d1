#!/usr/bin/env bash
# First run on a GPU node, inside the image (docker run --gpus all ... bash launch/gpu_smoke.sh): a tiny random
# model through the paper's flags on CUDA - bf16, Transformer Engine layer spec, FP8 (hybrid) on Hopper or newer,
# --use-distributed-optimizer, --sequence-parallel with TP=2 when 2 GPUs are visible, real vLLM on CUDA with
# sleep mode - for 3 RL steps with refit after each, then prints a PASS/FAIL table. A few minutes; no downloads.
#   GPUS=1 bash launch/gpu_smoke.sh        (default: 2 if two GPUs are visible, else 1)
#   OUT=/tmp/a3po_smoke bash launch/gpu_smoke.sh
# Exit code 0 only if every row passes. Never run by this project's CI (no GPU there): see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/a3po_gpu_smoke}
PY=${PY:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore} A3PO_PROGRESS=0

read -r NGPU CAPABILITY < <($PY -c 'import torch
n = torch.cuda.device_count()
print(n, "".join(map(str, torch.cuda.get_device_capability(0))) if n else "0")')
if [ "$NGPU" -lt 1 ]; then
    echo "gpu_smoke: no CUDA device visible to torch (run inside the image with --gpus all)" >&2
    exit 2
fi
GPUS=${GPUS:-$(( NGPU >= 2 ? 2 : 1 ))}
FP8=()
[ "$CAPABILITY" -ge 90 ] && FP8=(--fp8-format hybrid --fp8-recipe delayed)   # FP8 GEMMs need Hopper (sm90+)
SP=()
[ "$GPUS" -ge 2 ] && SP=(--sequence-parallel)

rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
$PY -m megatron_a3po.models.tiny --out "$OUT/hf" --family qwen2 --seed 0 >/dev/null
$TORCHRUN --nproc-per-node "$GPUS" -m megatron_a3po.train --config configs/tiny_cpu.yaml --hf-path "$OUT/hf" \
    --tensor-model-parallel-size "$GPUS" --rollout-tensor-parallel-size 1 "${SP[@]}" --bf16 \
    --use-distributed-optimizer --recompute-granularity full --transformer-impl transformer_engine "${FP8[@]}" \
    --train-steps 3 --eval-interval 0 --eval-prompts 16 --rollout-batch-size 16 --ppo-mini-batch-size 8 \
    --micro-batch-size 16 --gpu-memory-utilization 0.3 --output-dir "$OUT/rl" --save "$OUT/ckpt" \
    --save-interval 3 --export-hf "$OUT/rl_hf" > "$OUT/train.log" 2>&1 && train_rc=0 || train_rc=$?

$PY - "$OUT" "$train_rc" "$GPUS" "$CAPABILITY" "$(( $(date +%s) - start ))" <<'EOF'
import json, math, pathlib, sys

out, rc, gpus, cap, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
rows = []
metrics = out / "rl" / "metrics.jsonl"
if metrics.is_file():
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
steps = {r["step"]: r for r in rows if "train/lr" in r}
log = (out / "train.log").read_text(errors="replace") if (out / "train.log").is_file() else ""
checks = [
    ("job exits 0", rc == 0, f"exit code {rc} (log: {out / 'train.log'})"),
    ("3 RL steps logged", sorted(steps) == [1, 2, 3], f"steps {sorted(steps)}"),
    ("finite grad norms", bool(steps) and all(math.isfinite(r["train/grad_norm"]) for r in steps.values()),
     str([round(r["train/grad_norm"], 3) for r in steps.values()])),
    ("no skipped updates", bool(steps) and all(r.get("train/skipped_updates", 0) == 0 for r in steps.values()), ""),
    ("refit: vLLM vs Megatron |dlogp| < 0.05 (bf16)",
     bool(steps) and all(r.get("mismatch/logp_abs_mean", 1.0) < 0.05 for r in steps.values()),
     str([f"{r.get('mismatch/logp_abs_mean', float('nan')):.1e}" for r in steps.values()])),
    ("checkpoint step 3 written", (out / "ckpt" / "latest").is_file()
     and (out / "ckpt" / "latest").read_text().strip() == "step_000003", ""),
    ("HF export written", (out / "rl_hf" / "config.json").is_file(), ""),
    ("under 5 minutes", seconds < 300, f"{seconds}s"),
]
print(f"\nGPU smoke: {gpus} GPU(s), compute capability {cap}, FP8 {'on' if int(cap) >= 90 else 'off (needs sm90+)'}")
width = max(len(name) for name, _, _ in checks)
for name, ok, detail in checks:
    print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
if "Traceback" in log:
    print("\nlast lines of the log:\n" + "\n".join(log.splitlines()[-25:]))
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
EOF
