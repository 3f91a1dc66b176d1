#!/usr/bin/env bash
# One node of a job inside the image (docker build -t megatron-a3po .): run on every node with its NODE_RANK,
# or set LAUNCHER=launch/docker/run_node.sh for launch/slurm/a3po.sbatch.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/docker/run_node.sh --config configs/qwen3-8b-base_a3po.yaml ...
# Mounts (host path -> container): DATA_DIR -> /data (ro), MODELS_DIR -> /models (ro), CKPT_DIR -> /ckpt,
# HF_CACHE -> the user's HF cache, RUNS_DIR -> runs/ (metrics, plots). The configs use exactly these paths.
# Secrets such as WANDB_API_KEY go in by name (-e NAME): docker copies the value from this environment, so it never
# appears on a command line, in `ps` or in logs. DOCKER=echo prints the command instead of running it.
set -euo pipefail
DOCKER=${DOCKER:-docker}
IMAGE=${IMAGE:-megatron-a3po:latest}
APP=/opt/megatron-a3po
DATA_DIR=${DATA_DIR:-/data} MODELS_DIR=${MODELS_DIR:-/models} CKPT_DIR=${CKPT_DIR:-/ckpt}
HF_CACHE=${HF_CACHE:-$HOME/.cache/huggingface} RUNS_DIR=${RUNS_DIR:-$PWD/runs}

env_args=(-e NNODES="${NNODES:-${SLURM_NNODES:-1}}" -e NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
          -e MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" -e MASTER_PORT="${MASTER_PORT:-29500}"
          -e RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-a3po}}")
# Pass through by name: NCCL/UCX tuning, wandb (incl. WANDB_API_KEY), HF, torch and launcher settings that are set.
while IFS= read -r name; do
    env_args+=(-e "$name")
done < <(compgen -e | grep -E '^(NCCL_|UCX_|WANDB_|HF_|TORCH_|CUDA_DEVICE_MAX_CONNECTIONS$|OMP_NUM_THREADS$|NPROC_PER_NODE$|SHUTDOWN_TIMEOUT$|VLLM_)' || true)

# --network host: NCCL/IB and the rendezvous see the node's real interfaces. --ipc host: NCCL and vLLM use the
# host's /dev/shm; with DOCKER_IPC=private the container gets SHM_SIZE of its own instead of Docker's 64 MiB
# (the pre-flight check refuses less than 1 GiB). memlock unlimited: IB verbs pin memory.
ipc_args=(--ipc host)
[ "${DOCKER_IPC:-host}" = host ] || ipc_args=(--ipc "$DOCKER_IPC" --shm-size "${SHM_SIZE:-64g}")
exec "$DOCKER" run --rm --init --gpus all --network host "${ipc_args[@]}" \
    --ulimit memlock=-1 --ulimit stack=67108864 \
    "${env_args[@]}" \
    -v "$DATA_DIR":/data:ro -v "$MODELS_DIR":/models:ro -v "$CKPT_DIR":/ckpt \
    -v "$HF_CACHE":/home/a3po/.cache/huggingface -v "$RUNS_DIR":"$APP"/runs \
    -w "$APP" "$IMAGE" bash launch/node.sh "$@"
