#!/usr/bin/env bash
# One node of a training job: pre-flight checks, then torchrun with a c10d rendezvous. Every launcher goes through
# here (launch/torchrun.sh on one node, launch/slurm/a3po.sbatch on each node, the loopback two-node test), so
# the multi-node path tested on CPU is the one clusters run.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=head MASTER_PORT=29500 NPROC_PER_NODE=8 launch/node.sh --config X.yaml [flags]
#
# Environment (defaults in brackets):
#   NNODES [SLURM_NNODES or 1]     nodes in the job
#   NODE_RANK [SLURM_NODEID or 0]  this node's index; with c10d the rendezvous assigns ranks, node 0 hosts the store
#   MASTER_ADDR [127.0.0.1]        rendezvous host (the head node); MASTER_PORT [29500]
#   NPROC_PER_NODE [GPUs or 1]     ranks on this node (one per GPU)
#   RDZV_ID [SLURM_JOB_ID or a3po] rendezvous id, the same on every node of one job
#   SHUTDOWN_TIMEOUT [900]         seconds torchrun waits after SIGTERM before SIGKILL: the ranks finish the RL step
#                                  and write a checkpoint first (torchrun's default of 30 s is too short for that)
#   PYTHON [python]                interpreter with megatron_a3po installed; A3PO_SKIP_PREFLIGHT=1 skips the checks
# Everything after the variables ("$@": --config FILE ... and any Megatron/RL flags) reaches
# megatron_a3po.train unchanged.
set -euo pipefail

PYTHON=${PYTHON:-python}
export NNODES=${NNODES:-${SLURM_NNODES:-1}}
export NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
export NPROC_PER_NODE
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-a3po}}

if [ "${A3PO_SKIP_PREFLIGHT:-0}" != 1 ]; then
    # Fails in seconds, on this node, with the fix named: instead of minutes later inside every rank (or never).
    "$PYTHON" -m megatron_a3po.preflight "$@"
fi

echo "node $NODE_RANK/$NNODES: torchrun $NPROC_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT (id $RDZV_ID)"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-900}" \
    -m megatron_a3po.train "$@"
