#!/usr/bin/env bash
# `make demo`: from nothing, on 2 CPU cores. Tiny model -> SFT warm start -> a3po-convert HF->Megatron (TP=2)
# -> A3PO with colocated vLLM rollouts on 2 ranks -> plots + HF export. Last line:
#   validation accuracy: before 0.xx -> after 0.yy
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_DIR:-runs/demo}
SEED=${DEMO_SEED:-1234}
PY=.venv/bin/python
TORCHRUN=".venv/bin/torchrun --nproc-per-node 2"
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
start=$(date +%s)
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1/4 tiny random HF model (character-level tokenizer, qwen2 layout)"
$PY -m megatron_a3po.models.tiny --out "$OUT/base" --family qwen2 --seed 0

echo "== 2/4 SFT warm start on single-digit addition (Megatron TP=2, 2 ranks)"
$TORCHRUN -m megatron_a3po.sft --hf-path "$OUT/base" --sft-output "$OUT/sft_hf" --sft-steps 60 --sft-level 1 \
    --tensor-model-parallel-size 2 --make-vocab-size-divisible-by 64 --global-batch-size 64 --micro-batch-size 32 \
    --lr 1e-3 --min-lr 1e-4 --train-iters 60 --seed "$SEED" 2>&1 | grep -E '^\[sft\]|rror'

echo "== 3/4 a3po-convert hf-to-megatron (TP=2) and logit-parity verify"
$PY -m checkpoints_tools.convert hf-to-megatron --hf-path "$OUT/sft_hf" --output "$OUT/sft_megatron" \
    --tensor-model-parallel-size 2
$PY -m checkpoints_tools.convert verify --hf-path "$OUT/sft_hf" --megatron-path "$OUT/sft_megatron" \
    --tensor-model-parallel-size 2

echo "== 4/4 A3PO RL: Megatron TP=2 + vLLM (rollout TP=1 x 2 groups), 2 ranks"
$TORCHRUN -m megatron_a3po.train --config configs/tiny_cpu.yaml --load "$OUT/sft_megatron" \
    --output-dir "$OUT/rl" --export-hf "$OUT/rl_hf" --seed "$SEED" 2>&1 \
    | grep -E '^\[step|^metrics:|^wrote|rror|^validation accuracy' | grep -v '^validation accuracy' || true
echo "demo took $(( $(date +%s) - start ))s; outputs in $OUT (metrics.jsonl, curves.png, rl_hf/)"
tail -n 1 "$OUT/rl/final.txt"
