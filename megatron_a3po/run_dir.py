"""One run per directory: a fresh run refuses a --save or --output-dir that holds another run's files, and a lock
file marks the directories of a running job (stale when its process is gone).

The lock (`DIR/.a3po.lock`: pid, host, start time) is taken by rank 0 when the job starts and removed when it
ends; a SIGKILLed job leaves it behind, and the next job on the same host sees that the pid is gone and takes it
over with a warning. A lock from another host cannot be checked: the error names the host and pid, and the file
to delete once that job is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from megatron_a3po import checkpoint_files as files

LOCK = ".a3po.lock"


def foreign_files(cfg, resuming: bool) -> list[str]:
    """Problems with reusing the run's directories (empty when it may use them). A resumed run continues in
    its own directories; a fresh one needs empty ones."""
    if resuming:
        return []
    found = []
    save = Path(cfg.training.save) if cfg.training.save else None
    if save is not None and save.is_dir():
        steps = sorted(p.name for p in files.committed_steps(save).values())
        if steps or (save / files.LATEST).exists():
            found.append(f"--save {save} holds checkpoints of another run ({', '.join(steps[-3:]) or 'a latest file'}):"
                         f" resume that run with --load {save}, or give this run a new --save directory")
    metrics = Path(cfg.rl.output_dir) / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"--output-dir {metrics.parent} holds another run's metrics.jsonl: resume that run with --load "
                     "(its metrics continue there), or give this run a new --output-dir")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Lock files in the run's directories; `acquire()` returns the problems (empty: all taken)."""

    def __init__(self, directories: list[Path]):
        self.paths = [Path(d) / LOCK for d in dict.fromkeys(directories)]
        self.held: list[Path] = []

    def acquire(self) -> list[str]:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            problem = self._take(path, me)
            if problem:
                self.release()
                return [problem]
            self.held.append(path)
        return []

    def _take(self, path: Path, me: dict) -> str | None:
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(path.read_text())
                except (OSError, ValueError):
                    owner = {}
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    files.warn(f"{path}: took over a stale lock (pid {pid} on {host} is gone)")
                    path.unlink(missing_ok=True)
                    continue
                where = f"pid {pid} on host {host}, since {owner.get('started')}" if owner else "an unreadable lock"
                return (f"{path.parent} is in use by another run ({where}). Two runs in one directory overwrite each "
                        f"other; give this run its own --save / --output-dir, or delete {path} once that run is "
                        "known to be gone")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return None
        return f"{path}: could not take the lock"

    def release(self) -> None:
        for path in self.held:
            path.unlink(missing_ok=True)
        self.held = []
