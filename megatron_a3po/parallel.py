"""torch.distributed + megatron parallel_state: process groups, ranks and seeding.

Reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Backend: nccl with CUDA, gloo without (then platform.enable_cpu_compat() makes megatron-core CPU-safe).
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_a3po import platform


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    context: int = 1

    def data(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline * self.context)


def free_port() -> int:
    """A port the OS just handed out. Free now, not later: another process can take it before the job binds it
    (its ranks import for ~15 s first); a job started from here should hold it with `reserved_port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def reserved_port():
    """A port the OS hands out, kept bound (not listening) by this process until the block ends, for the ranks
    it starts to rendezvous on (MASTER_PORT). SO_REUSEADDR, set after the bind, lets rank 0's TCPStore (which
    sets it too) bind and listen there, while any other bind or ephemeral connect keeps off the port. Without
    it, a port chosen by free_port was taken by another pytest worker's process before rank 0 bound it
    (EADDRINUSE in a clean-clone make test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        yield sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """Create the default process group from the torchrun environment (a 1-rank group if absent)."""
    platform.enable_cpu_compat()
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one rank: its TCPStore binds a port the OS picks, at once
        os.environ["MASTER_PORT"] = "0" if os.environ["WORLD_SIZE"] == "1" else str(free_port())
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_model_parallel(sizes: ParallelSizes, seed: int = 1234) -> None:
    """Create megatron's TP/PP/CP/DP groups (order tp-cp-ep-dp-pp, Megatron's default) and seed."""
    from megatron.core import parallel_state as ps

    init_distributed()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline,
        context_parallel_size=sizes.context,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch; different per pipeline stage, and megatron's TP/DP RNG tracker states."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


_SHUTDOWN_HOOKS: list = []


def on_destroy(hook) -> None:
    """Run `hook()` at the start of destroy(): components with their own groups (vLLM) close while the
    default process group still exists."""
    _SHUTDOWN_HOOKS.append(hook)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    while _SHUTDOWN_HOOKS:
        _SHUTDOWN_HOOKS.pop()()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_scalar(value, op: str = "sum", group=None) -> float:
    """A number (or 0-dim tensor) reduced over `group` (default: all ranks) with one host sync. The reduction
    runs on a device tensor: NCCL refuses host tensors."""
    t = torch.as_tensor(value, dtype=torch.float64).to(platform.device()).reshape(1)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t.item()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    """The TP process group for vocab-parallel reductions, or None without tensor parallelism."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def pp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)
