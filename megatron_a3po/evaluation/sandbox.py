"""Run untrusted Python programs (generated code) in a sandbox and capture their output.

Each run: a fresh temp dir (removed afterwards), a clean environment (nothing of the evaluator's, so no
secrets), its own session/process group, stdin from a file, stdout/stderr read with a size cap, a wall-clock
deadline after which the whole process group is SIGKILLed. Inside, `_sandbox_child.py` confines the program
with what the kernel allows (namespaces, Landlock, rlimits; see that file) and reports which layers applied.
A program that loops, sleeps, forks, allocates or prints without bound is killed and reported as such; it
can never hang the caller.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
STDERR_CAP = 64 * 1024


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, including interpreter start-up
    cpu_s: int | None = None  # CPU seconds (default: ceil(timeout_s))
    memory_mb: int = 1024  # address space per process
    output_bytes: int = 4 * 1024 * 1024  # stdout cap; more is killed as "output_limit"
    file_bytes: int = 16 * 1024 * 1024  # largest file the program may write (RLIMIT_FSIZE)
    nproc: int = 16  # processes + threads (RLIMIT_NPROC)
    nofile: int = 256

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1 or self.nproc < 1:
            raise ValueError(f"invalid sandbox limits {self}: timeout_s > 0, memory_mb >= 64 (the interpreter "
                             "needs it), output_bytes >= 1, nproc >= 1")


@dataclass
class RunResult:
    status: str  # "ok" | "error" (non-zero exit) | "timeout" | "output_limit" | "sandbox_error"
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: dict = field(default_factory=dict)  # the layers that applied (reported by the launcher)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _clean_env(work: str) -> dict[str, str]:
    """Only what a Python program needs: the evaluator's variables (tokens, keys) never reach it."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work,
            "TMPDIR": work, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_paths() -> list[str]:
    """What the program may read and execute besides its work dir: the interpreter and its libraries, the
    system's shared libraries. Not /root, /home, /work or /etc beyond what the dynamic loader needs."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths |= {os.path.realpath(p) for p in list(paths)}
    paths |= {"/usr", "/lib", "/lib64", "/lib32", "/bin", "/sys/devices/system/cpu", "/proc",
              "/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group"}
    return sorted(paths)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: pgid == pid
    except ProcessLookupError:
        pass
    proc.wait()


def run_python(source: str, stdin: str = "", limits: SandboxLimits | None = None,
               isolation: str = "auto") -> RunResult:
    """Run `source` as main.py with `stdin`. isolation: "auto" (strongest available) or "audit" (force the weak
    audit-hook fallback, for tests and for kernels without namespaces or Landlock)."""
    limits = limits or SandboxLimits()
    limits.validate()
    if isolation not in ("auto", "audit"):
        raise ValueError(f"isolation must be 'auto' or 'audit', got {isolation!r}")
    base = tempfile.mkdtemp(prefix="a3po-sandbox-")
    report_r, report_w = os.pipe()
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        Path(work, "main.py").write_text(source, encoding="utf-8")
        stdin_path = os.path.join(base, "stdin")
        Path(stdin_path).write_text(stdin, encoding="utf-8")
        cfg = dict(isolation=isolation, report_fd=report_w, work_dir=work, read_paths=_read_paths(),
                   python=sys.executable, cpu_s=int(limits.cpu_s or -(-limits.timeout_s // 1)),
                   memory_bytes=limits.memory_mb << 20, file_bytes=limits.file_bytes, nproc=limits.nproc,
                   nofile=limits.nofile)
        with open(stdin_path, "rb") as stdin_file:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", "-S", CHILD, json.dumps(cfg)], stdin=stdin_file,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=_clean_env(work),
                                    start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        status, out, err = _collect(proc, start + limits.timeout_s, limits.output_bytes)
        wall = time.monotonic() - start
        report = _read_report(report_r)
        if status is None:
            rc = proc.returncode
            status = "ok" if rc == 0 else ("sandbox_error" if rc == 125 and not report else "error")
        return RunResult(status, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                         wall, report)
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str | None, bytes, bytes]:
    """Read stdout/stderr until both close; kill the process group at the deadline or past the output cap."""
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    status = None
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                if buf is err:
                    buf.extend(chunk[: max(0, STDERR_CAP - len(buf))])
                else:
                    buf.extend(chunk)
                    if len(buf) > cap:
                        status = "output_limit"
                        break
            if status:
                break
        if status is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"
    finally:
        sel.close()
        if status is not None or proc.returncode is None:
            _kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()
    return status, bytes(out[:cap]), bytes(err)


def _read_report(fd: int) -> dict:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        return json.loads(data) if data else {}
    except json.JSONDecodeError:
        return {}


_CAPABILITIES: dict | None = None


def isolation_report() -> dict:
    """Which layers this machine gives the sandbox (namespaces, private /proc, Landlock ABI, audit fallback)."""
    global _CAPABILITIES
    if _CAPABILITIES is None:
        _CAPABILITIES = run_python("pass", limits=SandboxLimits(timeout_s=30)).isolation
    return dict(_CAPABILITIES)
