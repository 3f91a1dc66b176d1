"""Hard timeouts for reward verification: a small pool of persistent worker processes.

`signal.alarm` only works on the main thread, and a verifier stuck inside C code (a huge integer power in
sympy) ignores signals anyway. So every verification runs in a separate worker process:

* workers are plain `python -c` subprocesses speaking newline-delimited JSON over stdin/stdout (no fork of the
  trainer, no pickling, no re-import of the trainer's `__main__`); they preload math-verify once, so the
  common case costs one pipe round trip;
* inside the worker a soft deadline (`setitimer`, at `soft_fraction` of the budget) interrupts Python-level
  work and the worker survives; if the worker still has not answered at the hard deadline it is SIGKILLed,
  reaped (no zombie) and replaced in the background;
* the pool is thread-safe: each worker serves one caller at a time, callers wait for a free worker;
* a worker exits when its stdin closes, so it never outlives the trainer. It ignores SIGTERM and SIGINT
  (blocked from its first instant, before Python starts): SLURM and Ctrl-C signal every process of the job, and
  a worker dying then would score its items as wrong; the trainer decides when to stop and closes the pool;
* a worker that cannot start (an import error) makes the pool fail with `RewardError`, not score everything
  as wrong.

Only functions named "module:function" are run, with JSON arguments: model text is data, never code.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from megatron_a3po.errors import RewardError  # noqa: F401  (re-exported)

DEFAULT_TIMEOUT_S = 5.0
_WORKER_CMD = "import megatron_a3po.rewards.timeout as t; t._worker_main()"
_IGNORED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class RewardTimeout(Exception):
    """The call did not finish within its budget. `killed` tells whether the worker had to be SIGKILLed."""

    def __init__(self, message: str, killed: bool):
        super().__init__(message)
        self.killed = killed


class RewardWorkerError(RuntimeError):
    """A worker crashed or failed to start."""


class RewardFunctionError(RewardWorkerError):
    """The called function raised inside the worker (the worker itself is fine); carries the remote error."""


def import_fix(error: str) -> str | None:
    """The fix for a worker-side import error message, or None if it is not one."""
    if any(name in error for name in ("math_verify", "latex2sympy", "antlr4")):
        return "install math-verify in the trainer's Python environment (`uv sync` or `pip install math-verify`)"
    if "ImportError" in error or "ModuleNotFoundError" in error:
        return "make the module importable in the trainer's environment (the workers use its sys.path)"
    return None


def _exit_reason(proc: subprocess.Popen) -> str:
    try:
        code = proc.wait(timeout=1.0)  # EOF comes just before the exit: let the code arrive
    except subprocess.TimeoutExpired:
        return "closed its output"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")


class _Worker:
    def __init__(self, preload: Sequence[str], memory_limit_mb: int | None, soft_fraction: float):
        env = dict(os.environ)
        env["A3PO_REWARD_SOFT_FRACTION"] = str(soft_fraction)
        # The worker resolves modules ("my_rewards:score") exactly like this process does.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["A3PO_REWARD_PRELOAD"] = ",".join(preload)
        env["A3PO_REWARD_MEMORY_MB"] = str(memory_limit_mb or 0)
        # Spawned with SIGTERM/SIGINT blocked (the mask survives exec) so there is no window, during
        # interpreter start-up, in which a job-wide signal kills it; the worker ignores them, then unblocks.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED_SIGNALS)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CMD], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, close_fds=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.ready = False
        self._buf = b""
        self._sent_path = list(sys.path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_line(self, deadline: float) -> bytes | None:
        """One protocol line, or None at the deadline. Raises RewardWorkerError on EOF (worker died)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RewardWorkerError(f"reward worker pid {self.pid} {_exit_reason(self.proc)}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def wait_ready(self, startup_timeout: float) -> None:
        if self.ready:
            return
        line = self._read_line(time.monotonic() + startup_timeout)
        if line is None:
            raise RewardWorkerError(f"reward worker pid {self.pid} did not start within {startup_timeout:.0f} s "
                                    "(importing math-verify on a loaded machine?); raise startup_timeout")
        msg = json.loads(line)
        if "error" in msg:
            fix = import_fix(msg["error"]) or "see the worker's traceback above in the log"
            raise RewardError(f"reward worker failed to start: {msg['error']}. Fix: {fix}; "
                              "until then no reward can be scored")
        self.ready = True

    def request(self, target: str, args: Sequence[Any], timeout: float) -> Any:
        req = {"target": target, "args": list(args), "soft": timeout}
        if sys.path != self._sent_path:  # keep module resolution in step with this process
            req["sys_path"] = self._sent_path = list(sys.path)
        payload = json.dumps(req).encode() + b"\n"
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
        except OSError as exc:
            raise RewardWorkerError(f"reward worker pid {self.pid} is gone ({exc})") from exc
        line = self._read_line(time.monotonic() + timeout)
        if line is None:
            raise RewardTimeout(f"{target} did not return within {timeout:g} s; worker killed", killed=True)
        msg = json.loads(line)
        if msg.get("timeout"):
            raise RewardTimeout(f"{target} interrupted after {timeout:g} s", killed=False)
        if "error" in msg:
            raise RewardFunctionError(f"{target} raised in the reward worker: {msg['error']}")
        return msg["result"]

    def kill(self) -> None:
        """SIGKILL and reap: never leaves a zombie or a hung process behind."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self, grace_s: float = 1.0) -> None:
        self.begin_close()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def begin_close(self) -> None:
        try:
            self.proc.stdin.close()  # the worker exits on EOF
        except OSError:
            pass


class WorkerPool:
    """Thread-safe pool of `size` reward workers. `call(target, args, timeout)` is the only entry point."""

    def __init__(self, size: int = 2, *, preload: Sequence[str] = ("math_verify",),
                 memory_limit_mb: int | None = 4096, startup_timeout: float = 120.0, soft_fraction: float = 0.8):
        if size < 1:
            raise ValueError(f"reward worker pool size must be >= 1, got {size}")
        self.size, self.preload, self.memory_limit_mb = size, tuple(preload), memory_limit_mb
        self.startup_timeout, self.soft_fraction = startup_timeout, soft_fraction
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._alive = 0
        self._closed = False
        self.failed: str | None = None  # why workers cannot start; then every call raises RewardError
        self.owner_pid = os.getpid()
        self.stats = {"calls": 0, "soft_timeouts": 0, "hard_timeouts": 0, "crashes": 0, "restarts": 0}

    def start(self) -> "WorkerPool":
        """Spawn all workers now so their imports overlap (otherwise they start on first use)."""
        with self._cond:
            if self.failed:
                raise RewardError(self.failed)
            n = self.size - self._alive
            self._alive += n
        self._idle_extend([_Worker(self.preload, self.memory_limit_mb, self.soft_fraction) for _ in range(n)])
        return self

    def _idle_extend(self, workers: list[_Worker]) -> None:
        with self._cond:
            self._idle.extend(workers)
            self._cond.notify_all()

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RewardWorkerError("reward worker pool is closed")
                if self.failed:  # an import error does not fix itself: fail fast, do not respawn
                    raise RewardError(self.failed)
                if self._idle:
                    # Prefer a worker that has already finished starting.
                    for i, w in enumerate(self._idle):
                        if w.ready:
                            return self._idle.pop(i)
                    return self._idle.pop(0)
                if self._alive < self.size:
                    self._alive += 1
                    break
                self._cond.wait()
        try:
            return _Worker(self.preload, self.memory_limit_mb, self.soft_fraction)
        except BaseException as exc:
            with self._cond:
                self._alive -= 1
                self._cond.notify()
            if isinstance(exc, OSError):  # out of processes/file descriptors: an infrastructure failure
                raise RewardWorkerError(f"cannot start a reward worker: {exc}") from exc
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if healthy and not self._closed:
            self._idle_extend([worker])
            return
        worker.kill()
        replacement = None
        if not self._closed and not self.failed:
            try:  # start the replacement now so its imports run while nobody waits
                replacement = _Worker(self.preload, self.memory_limit_mb, self.soft_fraction)
            except OSError:
                replacement = None
        with self._cond:
            if replacement is not None and self._closed:  # closed meanwhile: do not leak it
                replacement.kill()
                replacement = None
            self.stats["restarts"] += replacement is not None
            if replacement is None:
                self._alive -= 1
            else:
                self._idle.append(replacement)
            self._cond.notify_all()

    def call(self, target: str, args: Sequence[Any] = (), timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """Run `module:function(*args)` in a worker; RewardTimeout past `timeout` seconds (startup excluded)."""
        if os.getpid() != self.owner_pid:
            raise RewardWorkerError("this WorkerPool belongs to the parent process; create a new one after fork")
        if ":" not in target:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        worker = self._acquire()
        healthy = False
        try:
            worker.wait_ready(self.startup_timeout)
            with self._cond:
                self.stats["calls"] += 1
            # The worker's own deadline fires first; ours is the hard backstop.
            result = worker.request(target, args, timeout)
            healthy = True
            return result
        except RewardTimeout as exc:
            healthy = not exc.killed  # a soft timeout leaves the worker usable
            with self._cond:
                self.stats["hard_timeouts" if exc.killed else "soft_timeouts"] += 1
            raise
        except RewardFunctionError:
            healthy = True
            raise
        except RewardError as exc:
            with self._cond:
                self.failed = str(exc)
            raise
        except RewardWorkerError:
            with self._cond:
                self.stats["crashes"] += 1
            raise
        finally:
            self._release(worker, healthy)

    def worker_pids(self) -> list[int]:
        with self._cond:
            return [w.pid for w in self._idle]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for w in idle:
            w.begin_close()
        for w in idle:
            w.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def get_default_pool() -> WorkerPool:
    """The process-wide pool (min(4, cpu count) workers); recreated in a forked child."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool.owner_pid != os.getpid():
            _default_pool = WorkerPool(size=max(1, min(4, os.cpu_count() or 1)))
        return _default_pool


def run_with_timeout(target: str, args: Sequence[Any] = (), timeout: float = DEFAULT_TIMEOUT_S,
                     pool: WorkerPool | None = None) -> Any:
    return (pool or get_default_pool()).call(target, args, timeout)


@atexit.register
def _close_default_pool() -> None:
    if _default_pool is not None and _default_pool.owner_pid == os.getpid():
        _default_pool.close()


# ----------------------------------------------------------------------------------------------- worker side
class _SoftDeadline(BaseException):
    """BaseException so library code's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _SoftDeadline()


def _resolve(target: str, cache: dict):
    if target not in cache:
        import importlib

        module_name, _, attr = target.partition(":")
        fn = importlib.import_module(module_name)
        for part in attr.split("."):
            fn = getattr(fn, part)
        cache[target] = fn
    return cache[target]


def _worker_main() -> None:
    # Only the trainer stops workers (stdin EOF, or SIGKILL): ignore the job-wide signals, then unblock them.
    for sig in _IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _IGNORED_SIGNALS)
    # The protocol owns the real stdout; anything the called code prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        out.write(json.dumps(msg).encode() + b"\n")

    try:
        limit_mb = int(os.environ.get("A3PO_REWARD_MEMORY_MB", "0"))
        if limit_mb > 0:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
        import importlib

        for name in filter(None, os.environ.get("A3PO_REWARD_PRELOAD", "").split(",")):
            importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        send({"error": f"{type(exc).__name__}: {exc}"})
        return
    send({"ready": True})
    signal.signal(signal.SIGALRM, _on_alarm)
    cache: dict = {}
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            if "sys_path" in req:
                sys.path[:] = req["sys_path"]
            soft = float(req["soft"]) * float(os.environ.get("A3PO_REWARD_SOFT_FRACTION", "0.8"))
            try:
                signal.setitimer(signal.ITIMER_REAL, max(soft, 0.01))
                try:
                    result = _resolve(req["target"], cache)(*req["args"])
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftDeadline:
                send({"timeout": True})
                continue
            send({"result": result})
        except _SoftDeadline:
            send({"timeout": True})
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything the callee raises
            send({"error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
