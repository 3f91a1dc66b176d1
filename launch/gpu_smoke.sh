#!/usr/bin/env bash
# First run on a GPU node, inside the image (docker run --gpus all ... bash launch/gpu_smoke.sh): a tiny random qwen2
# model through the paper's flags on CUDA, then a PASS/FAIL table. A few minutes; no downloads. Never run by this
# project's CI (no GPU there): see the README. What it covers:
#   - a3po-convert hf-to-megatron output (local layer spec) loaded with --load into the Transformer Engine spec
#   - bf16, TE layer spec, --use-distributed-optimizer, full recompute, packed THD micro-batches (--max-tokens-per-gpu)
#   - FP8 (hybrid, delayed) with packing on Hopper or newer (sm90+)
#   - TP=2 with --sequence-parallel and a rollout group of 2 GPUs (--rollout-tensor-parallel-size 2) when 2 GPUs are
#     visible; real vLLM on CUDA with sleep mode and refit after every step
#   - run A: 3 RL steps, checkpoints at steps 2 and 3, HF export; run B: --load A's --save dir, steps 4-5 (resume)
#   - each phase's measured peak device memory next to `a3po plan`'s figure for this job (ratio)
# The training-only part (no vLLM, no TE: a machine with torch + CUDA only) is launch/gpu_train_smoke.py.
#   GPUS=1 bash launch/gpu_smoke.sh        (default: 2 if two GPUs are visible, else 1)
#   OUT=/tmp/a3po_smoke bash launch/gpu_smoke.sh
# Exit code 0 only if every row passes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/a3po_gpu_smoke}
PY=${PY:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore} A3PO_PROGRESS=0

# SMOKE_DRY_RUN=1 (no GPU needed; tests/test_gpu_smoke.py): as for 2 GPUs without FP8, make the model and check
# run A's flags with --dry-run (WORLD_SIZE=2, CUDA emulated), so a flag this script gets wrong fails on CPU.
DRY_RUN=${SMOKE_DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    NGPU=2 CAPABILITY=0
else
    read -r NGPU CAPABILITY < <($PY -c 'import torch
n = torch.cuda.device_count()
print(n, "".join(map(str, torch.cuda.get_device_capability(0))) if n else "0")')
fi
if [ "$NGPU" -lt 1 ]; then
    echo "gpu_smoke: no CUDA device visible to torch (run inside the image with --gpus all)" >&2
    exit 2
fi
GPUS=${GPUS:-$(( NGPU >= 2 ? 2 : 1 ))}
FP8=()
[ "$CAPABILITY" -ge 90 ] && FP8=(--fp8-format hybrid --fp8-recipe delayed)   # FP8 GEMMs need Hopper (sm90+)
SP=()
[ "$GPUS" -ge 2 ] && SP=(--sequence-parallel)
# The job's flags, shared by both runs and by the memory plan. Packs of at most 256 tokens (a multiple of FP8's token
# rule at TP 1 or 2); the rollout group spans every GPU of the job (2 when 2 are visible).
FLAGS=(--config configs/tiny_cpu.yaml --hf-path "$OUT/hf" --tensor-model-parallel-size "$GPUS"
       --rollout-tensor-parallel-size "$GPUS" "${SP[@]}" --bf16 --use-distributed-optimizer
       --recompute-granularity full --transformer-impl transformer_engine "${FP8[@]}" --max-tokens-per-gpu 256
       --eval-interval 0 --eval-prompts 16 --rollout-batch-size 16 --ppo-mini-batch-size 8
       --gpu-memory-utilization 0.3 --output-dir "$OUT/rl" --save "$OUT/ckpt" --save-interval 2)

rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
$PY -m megatron_a3po.models.tiny --out "$OUT/hf" --family qwen2 --seed 0 >/dev/null
convert_rc=0
[ "$DRY_RUN" = 1 ] || $PY -m checkpoints_tools.convert hf-to-megatron --hf-path "$OUT/hf" --output "$OUT/converted" \
    --tensor-model-parallel-size "$GPUS" --make-vocab-size-divisible-by 64 --no-progress > "$OUT/convert.log" 2>&1 \
    && convert_rc=0 || convert_rc=$?
if [ "$DRY_RUN" = 1 ]; then
    A3PO_EMULATE_CUDA=1 WORLD_SIZE="$GPUS" $PY -m megatron_a3po.train "${FLAGS[@]}" --train-steps 3 \
        --export-hf "$OUT/rl_hf" --dry-run > "$OUT/dry_run.log" 2>&1 || { tail -5 "$OUT/dry_run.log" >&2; exit 1; }
    echo "gpu_smoke dry run: run A's flags accepted (GPUS=$GPUS)"
    exit 0
fi
# A: from the converted checkpoint, 3 steps, saves at steps 2 and 3, HF export.
$TORCHRUN --nproc-per-node "$GPUS" -m megatron_a3po.train "${FLAGS[@]}" --load "$OUT/converted" --train-steps 3 \
    --export-hf "$OUT/rl_hf" > "$OUT/train_a.log" 2>&1 && a_rc=0 || a_rc=$?
# B: resume from A's --save dir (its newest checkpoint, step 3) and train on to step 5.
$TORCHRUN --nproc-per-node "$GPUS" -m megatron_a3po.train "${FLAGS[@]}" --load "$OUT/ckpt" --train-steps 5 \
    > "$OUT/train_b.log" 2>&1 && b_rc=0 || b_rc=$?

$PY - "$OUT" "$convert_rc,$a_rc,$b_rc" "$GPUS" "$CAPABILITY" "$(( $(date +%s) - start ))" "${FLAGS[@]}" <<'EOF'
import json, math, pathlib, sys

import torch

sys.path.insert(0, "launch")
from gpu_train_smoke import memory_rows, plan_figures

out, gpus, cap, seconds, flags = pathlib.Path(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), \
    sys.argv[6:]
convert_rc, a_rc, b_rc = map(int, sys.argv[2].split(","))
metrics = out / "rl" / "metrics.jsonl"
rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
steps = {r["step"]: r for r in rows if "train/lr" in r}  # B trims A's rows after its checkpoint, then appends
logs = {name: (out / name).read_text(errors="replace") if (out / name).is_file() else ""
        for name in ("convert.log", "train_a.log", "train_b.log")}
fp8 = cap >= 90
latest = out / "ckpt" / "latest"
checks = [
    ("a3po-convert hf-to-megatron exits 0", convert_rc == 0, f"exit code {convert_rc} (log: {out / 'convert.log'})"),
    ("run A (--load the converted checkpoint) exits 0", a_rc == 0, f"exit code {a_rc} (log: {out / 'train_a.log'})"),
    ("run B (--load A's --save dir) resumes at step 4", b_rc == 0 and "at RL step 4" in logs["train_b.log"],
     f"exit code {b_rc} (log: {out / 'train_b.log'})"),
    ("RL steps 1-5 logged", sorted(steps) == [1, 2, 3, 4, 5], f"steps {sorted(steps)}"),
    ("finite grad norms", bool(steps) and all(math.isfinite(r["train/grad_norm"]) for r in steps.values()),
     str([round(r["train/grad_norm"], 3) for r in steps.values()])),
    ("no skipped updates", bool(steps) and all(r.get("train/skipped_updates", 0) == 0 for r in steps.values()), ""),
    ("refit: vLLM vs Megatron |dlogp| < 0.05 (bf16)",
     bool(steps) and all(r.get("mismatch/logp_abs_mean", 1.0) < 0.05 for r in steps.values()),
     str([f"{r.get('mismatch/logp_abs_mean', float('nan')):.1e}" for r in steps.values()])),
    ("packed THD micro-batches (--max-tokens-per-gpu 256)", bool(steps) and all(
        0 < r.get("train/real_tokens", 0) <= r.get("train/computed_tokens", 0) for r in steps.values()),
     str([int(r.get("train/micro_batches", 0)) for r in steps.values()]) + " micro-batches per step"),
    ("checkpoints written (latest = step 5)", latest.is_file() and latest.read_text().strip() == "step_000005"
     and (out / "ckpt" / "step_000002").is_dir(), ""),
    ("HF export written", (out / "rl_hf" / "config.json").is_file(), ""),
    ("peak device memory per phase measured", any(k.startswith("memory/") for r in steps.values() for k in r), ""),
    ("under 10 minutes", seconds < 600, f"{seconds}s"),
]
print(f"\nGPU smoke: {gpus} GPU(s) ({torch.cuda.get_device_name(0)}), compute capability {cap}, TP {gpus}, rollout "
      f"TP {gpus}, FP8 {'on, with packing' if fp8 else 'off (needs sm90+)'}")
width = max(len(name) for name, _, _ in checks)
for name, ok, detail in checks:
    print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
print("  peak device memory per phase (largest over steps, this rank) vs `a3po plan` (reserve 0):")
try:
    figures = plan_figures(flags, gpus, torch.cuda.get_device_properties(0).total_memory, with_vllm=True)
    print("\n".join(memory_rows(list(steps.values()), figures)))
except Exception as err:  # the table is a report; the rows above decide the exit code
    print(f"    (no plan: {type(err).__name__}: {err})")
for name, log in logs.items():
    if "Traceback" in log:
        print(f"\nlast lines of {out / name}:\n" + "\n".join(log.splitlines()[-25:]))
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
EOF
