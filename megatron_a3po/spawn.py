"""Start N local ranks without torchrun: used by tests and by CLIs that need TP/PP > 1.

`run_in_ranks(fn, world_size, args)` spawns `world_size` processes, sets the same environment torchrun
would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), initialises torch.distributed
(gloo without CUDA, nccl with it), calls `fn(*args)` and returns every rank's return value.
A failure in any rank raises RuntimeError carrying every failing rank's traceback; a rank that
hangs is killed after `timeout` seconds so a broken collective never blocks a test suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable, Sequence

from megatron_a3po import parallel
from megatron_a3po.errors import UserError


def _rank_main(fn, args, rank, world_size, port, results, extra_env):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env,
    )
    try:
        parallel.init_distributed()
        # Pickled to bytes here: tensors sent through a multiprocessing queue travel as shared-memory
        # handles that die with this process.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except UserError as err:  # the parent re-raises it as is: a one-line message, not a traceback
        results.put((rank, False, (traceback.format_exc(), _pickled(err))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, False, (traceback.format_exc(), None)))
    finally:
        try:
            parallel.destroy()
        except Exception:  # noqa: BLE001
            pass


def _pickled(err: BaseException) -> bytes | None:
    try:
        return pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle is reported by its traceback
        return None


def _collect(procs, results, world_size: int, timeout: float) -> dict[int, tuple[bool, Any]]:
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
            outcomes[rank] = (ok, value)
        except queue.Empty:
            # A rank that died without reporting (segfault, os._exit) would otherwise cost the whole timeout.
            if all(p.exitcode is not None for p in procs):
                break
        if any(not ok for ok, _ in outcomes.values()):
            # Give the other ranks a moment to report their own errors, then stop waiting for them.
            time.sleep(2.0)
            while True:
                try:
                    rank, ok, value = results.get_nowait()
                    outcomes[rank] = (ok, value)
                except queue.Empty:
                    break
            break
    return outcomes


def run_in_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run module-level `fn(*args)` in `world_size` fresh processes; return the per-rank results."""
    ctx = mp.get_context("spawn")  # fork would copy torch/OpenMP thread state; spawn is what torchrun gives
    results = ctx.Queue()
    with parallel.reserved_port() as port:  # held until the ranks are gone: nothing else can take it meanwhile
        procs = [
            ctx.Process(target=_rank_main, args=(fn, tuple(args), r, world_size, port, results, dict(env or {})))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            outcomes = _collect(procs, results, world_size, timeout)
        finally:  # never leave ranks behind, whatever ended the wait (timeout, a failed rank, KeyboardInterrupt)
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    failures, user_errors = [], []
    for r in range(world_size):
        if r not in outcomes:
            failures.append(f"--- rank {r}: no result (exit code {procs[r].exitcode}; hung past {timeout:.0f}s or died)")
        elif not outcomes[r][0]:
            text, user_error = outcomes[r][1]
            failures.append(f"--- rank {r} failed:\n{text}")
            if user_error is not None:
                user_errors.append(pickle.loads(user_error))
    if user_errors:  # the input was refused: that is the news, other ranks' failures follow from it
        raise user_errors[0]
    if failures:
        raise RuntimeError(f"{len(failures)} of {world_size} ranks failed running {fn.__name__}:\n" + "\n".join(failures))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
