"""vLLM's CPU backend all-reduce segments in /dev/shm: a name of its own per engine, a killed job's leftovers removed.

A rollout group of >= 2 ranks on vLLM's CPU backend keeps shared-memory segments for its all-reduce, named by
`_CPUSHMDistributed.make_group_name` (vllm/distributed/device_communicators/cpu_communicator.py) as
`{VLLM_DIST_IDENT}-{group}-[{ranks}]-cpushm`, one `_<rank>` file per rank, created with O_EXCL by the C++ shm
manager (`init_shm_manager`: "create shm in SHMManager failed. errno: 17" when the name exists). vLLM's CPU worker
(vllm/v1/worker/cpu_worker.py, `CPUWorker.init_device`) sets VLLM_DIST_IDENT from the port of its
`distributed_init_method`, which under `external_launcher` is always "env://": every job on a host got the same
name, so two jobs at once collided, and a SIGKILLed job's segments (never unlinked) blocked every later one.

Here each engine gets `a3po-<pid of its group's first rank>-<random token>`: unique per engine, the same on all
ranks of a group (vLLM checks that: `_all_group_ranks_share_shm_group_name`). The worker overwrites the variable
right before `init_worker_distributed_environment`, so that call is wrapped to set ours. Before an engine
starts, segments of ours whose first rank's process is gone (a killed job) are unlinked; a live job's never are.
Only on vLLM's CPU backend: on GPUs the all-reduce is NCCL and no such segment exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PREFIX = "a3po-"
SHM_ROOT = Path("/dev/shm")
_SEGMENT = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-.*-cpushm")

_ident: str | None = None  # the identifier of the engine being started in this process


def make_ident(leader_pid: int, token: str) -> str:
    """The segment-name identifier of one engine: its rollout group's first rank's pid and a random hex token."""
    return f"{PREFIX}{leader_pid}-{token}"


def segments(ident: str, root: Path = SHM_ROOT) -> list[Path]:
    """The segment files an engine with this identifier holds on this host."""
    return sorted(p for p in root.glob(f"{ident}-*") if "cpushm" in p.name)


def release(ident: str, root: Path = SHM_ROOT) -> None:
    """Unlink an engine's segments when it closes (vLLM leaves them: seen after normal exits too). Every rank of
    the group has mapped all of them since the engine started, so the memory stays valid until unmapped."""
    for path in segments(ident, root):
        path.unlink(missing_ok=True)


def remove_orphans(root: Path = SHM_ROOT) -> list[str]:
    """Unlink our segments whose group leader process no longer exists on this host; returns their names.
    Segments of other programs (no `a3po-<pid>-` prefix) are never touched."""
    removed = []
    for path in root.glob(f"{PREFIX}*"):
        match = _SEGMENT.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:  # another job cleaned it first
            pass
    return removed


def use_ident(ident: str) -> None:
    """Make vLLM's CPU worker in this process name its segments with `ident` (call before `LLM(...)`)."""
    global _ident
    from vllm.v1.worker import cpu_worker

    _ident = ident
    original = cpu_worker.init_worker_distributed_environment
    if getattr(original, "_a3po_wrapped", False):
        return

    def init_with_our_ident(*args, **kwargs):
        # CPUWorker.init_device has just set VLLM_DIST_IDENT from "env://"; the communicators read it next.
        os.environ["VLLM_DIST_IDENT"] = _ident
        return original(*args, **kwargs)

    init_with_our_ident._a3po_wrapped = True
    cpu_worker.init_worker_distributed_environment = init_with_our_ident


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
