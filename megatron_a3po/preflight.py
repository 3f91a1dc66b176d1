"""Pre-flight checks run by launch/node.sh on every node before torchrun starts.

On a cluster a mistake found inside the ranks costs a queue wait, a rendezvous and minutes of imports and model
building on every node; a full /dev/shm or an unwritable --save dir can even surface hours later (NCCL bus error,
first checkpoint). These checks take seconds and name the problem and the fix:
  - the training flags parse and validate for the whole job's world size (config files, --hf-path, --load,
    datasets, TP/PP against the model, batch divisibility, the rollout context: the same validation the ranks run);
  - what the ranks read later (job.check_inputs): the tokenizer, every row of the datasets through the job's
    loader (the summary counts rows and prompts longer than --max-prompt-length), the reward function imports;
  - the reward function imports and scores one example in its worker pool (math-verify installed, a
    module:function reward found);
  - --save and --output-dir are writable (checked by writing a probe file);
  - /dev/shm is large enough (NCCL and vLLM use it; Docker's default is 64 MiB);
  - MASTER_ADDR resolves, and on node 0 MASTER_PORT is free;
  - NPROC_PER_NODE does not exceed the visible GPUs, and vLLM's and Transformer Engine's kernels load with this
    torch (an image whose torch differs from their builds fails here, not at the first rollout).
Usage: `NNODES=.. NPROC_PER_NODE=.. MASTER_ADDR=.. MASTER_PORT=.. python -m megatron_a3po.preflight TRAIN_FLAGS`.
Exit 0 when all pass, 2 with one `preflight error:` line per problem otherwise.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import uuid
from pathlib import Path

MIN_SHM_GIB = 1.0  # NCCL's shared-memory transport and vLLM need far more than Docker's 64 MiB default


def check(argv: list[str], env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """(problems, summary: the world's size, then one line per dataset read). `env` defaults to os.environ; it
    carries the launcher's NNODES etc."""
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    try:
        nnodes, nproc = int(env.get("NNODES", "1")), int(env.get("NPROC_PER_NODE", "1"))
        node_rank, port = int(env.get("NODE_RANK", "0")), int(env.get("MASTER_PORT", "29500"))
    except ValueError as err:
        return [f"NNODES, NPROC_PER_NODE, NODE_RANK and MASTER_PORT must be integers ({err}); fix the launcher's "
                "environment"], ""
    if nnodes < 1 or nproc < 1 or not 0 <= node_rank < nnodes:
        return [f"NNODES={nnodes} NPROC_PER_NODE={nproc} NODE_RANK={node_rank}: need NNODES, NPROC_PER_NODE >= 1 "
                "and 0 <= NODE_RANK < NNODES"], ""
    world = nnodes * nproc
    summary = f"world {world} = {nnodes} node(s) x {nproc}"
    config_problems, notes = _check_config(argv, world)
    problems += config_problems
    summary = "\n".join([summary, *notes])
    problems += _check_shm(float(env.get("A3PO_MIN_SHM_GIB", MIN_SHM_GIB)))
    problems += _check_rendezvous(env.get("MASTER_ADDR", "127.0.0.1"), port, node_rank)
    problems += _check_gpus(nproc)
    return problems, summary


def _check_config(argv: list[str], world: int) -> tuple[list[str], list[str]]:
    """(problems, notes: one line per dataset read)."""
    from megatron_a3po import config as C
    from megatron_a3po.errors import RewardError, UserError
    from megatron_a3po.job import resolve_job

    try:
        cfg, _ = C.parse_args(argv)
    except UserError as err:
        return [str(err)], []
    save, out = cfg.training.save, cfg.rl.output_dir
    problems = []
    notes: list[str] = []
    try:
        job = resolve_job(cfg, world)
    except UserError as err:
        problems.append(f"{err} (validated for the job's world size {world})")
    else:
        from megatron_a3po.job import check_inputs
        from megatron_a3po.rewards import check_reward_fn

        notes, input_problems = check_inputs(job)  # tokenizer, every dataset row, the reward imports
        problems += input_problems
        try:  # the reward scores one example in its worker pool (math-verify usable, hook runs)
            if not any(p.startswith("--reward") for p in input_problems):
                check_reward_fn(cfg.rl.reward)
        except RewardError as err:
            problems.append(f"--reward {cfg.rl.reward}: {err}")
    for flag, path in (("--save", save), ("--output-dir", out)):
        if path:
            problem = _writable(Path(path))
            if problem:
                problems.append(f"{flag} {path}: {problem}; point it at a writable directory (for --save on several "
                                "nodes: a shared filesystem every node mounts at the same path)")
    return problems, notes


def _writable(path: Path) -> str | None:
    """None if a file can be created in `path` (made if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".preflight-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        return f"not writable ({err.strerror or err})"
    return None


def _check_shm(min_gib: float) -> list[str]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return ["/dev/shm is missing; NCCL and vLLM need it: mount a tmpfs there (docker run --shm-size 64g or "
                "--ipc host)"]
    size_gib = st.f_frsize * st.f_blocks / 2**30
    if size_gib < min_gib:
        return [f"/dev/shm is {size_gib:.2f} GiB, below the {min_gib:g} GiB minimum (NCCL fails with 'Bus error' or "
                "'unhandled system error' when it fills up); in Docker pass --ipc host or --shm-size 64g "
                "(launch/docker/run_node.sh does), on bare metal remount /dev/shm larger"]
    return []


def _check_rendezvous(host: str, port: int, node_rank: int) -> list[str]:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except socket.gaierror as err:
        return [f"MASTER_ADDR {host!r} does not resolve ({err.strerror}); set it to the head node's hostname or IP "
                "as every node sees it (the sbatch script uses the first host of SLURM_JOB_NODELIST)"]
    if node_rank != 0 or not 0 < port < 65536:
        return [] if 0 < port < 65536 else [f"MASTER_PORT {port} is not a TCP port; use 1024-65535"]
    # Node 0's torchrun hosts the rendezvous store on MASTER_PORT; a port taken by another job would make this
    # agent a client of that job's store instead (a confusing hang), so check it now.
    for address in addresses:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return [f"MASTER_PORT {port} is already in use on {host} ({address}); pick a free port "
                            "(e.g. MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)))"]
                # EADDRNOTAVAIL: MASTER_ADDR is not an address of this machine, so this is not the store host.
    return []


def _check_gpus(nproc: int) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []  # CPU/gloo development runs: any number of ranks
    gpus = torch.cuda.device_count()
    problems = []
    if nproc > gpus:
        problems.append(f"NPROC_PER_NODE={nproc} but this node sees {gpus} GPU(s) (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch one rank per GPU")
    # Compiled kernels built against another torch fail only at first use otherwise (undefined symbol). vLLM's CUDA
    # wheel has no vllm._C: vllm/platforms/cuda.py imports vllm._C_stable_libtorch (tests/test_dockerfile.py).
    for module in ("vllm._C_stable_libtorch", "transformer_engine.pytorch"):
        try:
            __import__(module)
        except (ImportError, OSError) as err:
            problems.append(f"cannot load {module} with torch {torch.__version__} (CUDA {torch.version.cuda}): {err}; "
                            "use an image whose torch matches vLLM's and Transformer Engine's builds (the project's "
                            "Dockerfile builds and loads them together) or rebuild them against this torch")
    return problems


def main(argv: list[str] | None = None) -> int:
    problems, summary = check(sys.argv[1:] if argv is None else argv)
    node = os.environ.get("NODE_RANK", "0")
    for problem in problems:
        print(f"preflight error (node {node}): {problem}", file=sys.stderr, flush=True)
    if problems:
        return 2
    first, *notes = summary.splitlines()
    print("\n".join([f"preflight ok (node {node}): {first}", *(f"preflight (node {node}): {n}" for n in notes)]),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
