#!/usr/bin/env bash
# One node, all its GPUs (or NPROC_PER_NODE ranks): pre-flight checks, then torchrun (c10d on localhost).
#   launch/torchrun.sh --config configs/qwen2.5-math-7b_a3po.yaml [Megatron/RL flags...]
#   NPROC_PER_NODE=2 PYTHON=.venv/bin/python launch/torchrun.sh --config configs/tiny_cpu.yaml --tiny-model qwen2
# The config and every flag go to megatron_a3po.train unchanged. Same code path as multi-node: launch/node.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export NNODES=1 NODE_RANK=0 MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
exec bash launch/node.sh "$@"
