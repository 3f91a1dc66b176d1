"""Run untrusted Python programs (generated code) in a sandbox and capture their output.

Each run: a fresh temp dir (removed afterwards), a clean environment (nothing of the evaluator's, so no
secrets), its own session/process group, stdin from a file, stdout/stderr read with a size cap, a wall-clock
deadline. Inside, `_sandbox_child.py` confines the program with what the kernel allows (namespaces, Landlock,
seccomp, rlimits; see that file) and reports which layers applied. The sandbox fails closed: unless the
filesystem is confined and the network isolated it refuses to run anything (SandboxUnavailable) unless
`SandboxLimits.allow_weak` (`a3po eval --allow-weak-sandbox`). At the deadline every process the program started
dies, setsid or not: a cgroup's cgroup.kill where one is writable, and always a /proc walk of the launcher's
descendants (the launcher is a child subreaper, or the parent of the PID namespace's init).
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

from megatron_a3po.errors import ConfigError, UserError
from megatron_a3po.evaluation._sandbox_child import confinement as _verdict, process_tree

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
STDERR_CAP = 64 * 1024
LAYERS = ("namespaces", "landlock", "seccomp", "cgroup")
DEFAULT_ISOLATION = "auto"  # what run_python(isolation=None) uses; "none" simulates a kernel without any layer
FLAG = "--allow-weak-sandbox"


class SandboxUnavailable(UserError, RuntimeError):
    """This machine cannot confine generated code and weak isolation was not allowed."""


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, including interpreter start-up
    cpu_s: int | None = None  # CPU seconds (default: ceil(timeout_s))
    memory_mb: int = 1024  # address space per process
    output_bytes: int = 4 * 1024 * 1024  # stdout cap; more is killed as "output_limit"
    file_bytes: int = 16 * 1024 * 1024  # largest file the program may write (RLIMIT_FSIZE)
    nproc: int = 16  # processes + threads (RLIMIT_NPROC)
    nofile: int = 256
    allow_weak: bool = False  # policy, not a limit: run even without filesystem confinement + network isolation

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1 or self.nproc < 1:
            raise ConfigError(f"invalid sandbox limits {self}: timeout_s > 0, memory_mb >= 64 (the interpreter "
                             "needs it), output_bytes >= 1, nproc >= 1")


@dataclass
class RunResult:
    status: str  # "ok" | "error" (non-zero exit) | "timeout" | "output_limit" | "sandbox_error"
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: dict = field(default_factory=dict)  # the layers that applied and the verdict (see confinement())

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _layers(isolation: str | None) -> list[str]:
    isolation = isolation or DEFAULT_ISOLATION
    if isolation == "auto":
        return list(LAYERS)
    if isolation in ("none", "audit"):
        return []
    chosen = isolation.split("+")
    if any(layer not in LAYERS for layer in chosen):
        raise ConfigError(f"isolation must be 'auto', 'none' or layers joined by '+' from {LAYERS}, got {isolation!r}")
    return chosen


def _clean_env(work: str) -> dict[str, str]:
    """Only what a Python program needs: the evaluator's variables (tokens, keys) never reach it."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work,
            "TMPDIR": work, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_paths(proc: bool = True) -> list[str]:
    """What the program may read and execute besides its work dir: the interpreter and its libraries, the
    system's shared libraries. Not /root, /home, /work or /etc beyond what the dynamic loader needs. The audit
    layer gets no /proc (Landlock instead relies on its ptrace scoping to hide other processes)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths |= {"/usr", "/lib", "/lib64", "/lib32", "/bin", "/sys/devices/system/cpu", "/etc/ld.so.cache",
              "/etc/localtime", "/etc/passwd", "/etc/group"} | ({"/proc"} if proc else set())
    return sorted(paths | {os.path.realpath(p) for p in paths})


# ---- cgroup v2: one per run where the evaluator's own cgroup is writable (root, or a delegated subtree) --------

_CGROUP_BASE: str | None = None


def _cgroup_base() -> str:
    global _CGROUP_BASE
    if _CGROUP_BASE is None:
        _CGROUP_BASE = ""
        try:
            with open("/proc/self/cgroup") as f:
                own = next((line[3:].strip() for line in f if line.startswith("0::")), None)
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split(" - ")[0].split()[3:5] for line in f if " - cgroup2 " in line]
        except OSError:
            return ""
        for root, point in mounts:
            root = root.rstrip("/")
            if own is not None and (own + "/").startswith(root + "/"):
                base = os.path.normpath(point + "/" + own[len(root):])
                if os.access(base, os.W_OK | os.X_OK):
                    _CGROUP_BASE = base
                    break
    return _CGROUP_BASE


def _make_cgroup() -> str | None:
    base = _cgroup_base()
    if not base:
        return None
    try:
        path = tempfile.mkdtemp(prefix="a3po-sandbox-", dir=base)
    except OSError:
        return None
    if not os.path.exists(os.path.join(path, "cgroup.kill")):  # Linux < 5.14
        os.rmdir(path)
        return None
    try:  # where the pids controller is delegated: a process cap that binds uid 0 too (RLIMIT_NPROC does not)
        Path(path, "pids.max").write_text("304")  # as the PID namespace's pid_max (301), plus the launcher
    except OSError:
        pass
    return path


def _remove_cgroup(path: str) -> None:
    """Kill whatever is left in it, wait until it is empty, remove it."""
    try:
        Path(path, "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 2.0
        while "populated 1" in Path(path, "cgroup.events").read_text() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.rmdir(path)
    except OSError:
        pass


def _kill(pid: int) -> None:
    """SIGKILL through a pidfd: the pid cannot be recycled between look-up and kill."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfds (Linux < 5.3): a plain kill
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launcher is not reaped yet, so its pid is ours. Kill its descendants while it lives (a subreaper, or the
    parent of the PID namespace's init: orphans stay in the tree), until none is left; then the launcher."""
    for _ in range(1000):
        table, tree, todo = process_tree(), [], [proc.pid]
        while todo:
            kids = table.get(todo.pop(), [])
            tree += kids
            todo += kids
        if not tree:
            break
        for pid in tree:
            _kill(pid)
        time.sleep(0.001)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()
    proc.wait()


def run_python(source: str, stdin: str = "", limits: SandboxLimits | None = None,
               isolation: str | None = None) -> RunResult:
    """Run `source` as main.py with `stdin`. isolation: "auto" (every layer the kernel gives; the default), "none"
    (rlimits and the audit hook only) or layers joined by "+" (tests, diagnosis). Raises SandboxUnavailable when
    the layers in force are weak and `limits.allow_weak` is off."""
    limits = limits or SandboxLimits()
    limits.validate()
    layers = _layers(isolation)
    base = tempfile.mkdtemp(prefix="a3po-sandbox-")
    report_r, report_w = os.pipe()
    cgroup = _make_cgroup() if "cgroup" in layers else None
    proc = None
    try:
        work = os.path.realpath(os.path.join(base, "work"))
        os.mkdir(work, 0o700)
        Path(work, "main.py").write_text(source, encoding="utf-8")
        stdin_path = os.path.join(base, "stdin")
        Path(stdin_path).write_text(stdin, encoding="utf-8")
        cfg = dict(layers=layers, allow_weak=limits.allow_weak, cgroup=cgroup, report_fd=report_w, work_dir=work,
                   read_paths=_read_paths(), audit_reads=_read_paths(proc=False), python=sys.executable,
                   cpu_s=int(limits.cpu_s or -(-limits.timeout_s // 1)), memory_bytes=limits.memory_mb << 20,
                   file_bytes=limits.file_bytes, nproc=limits.nproc, nofile=limits.nofile)
        with open(stdin_path, "rb") as stdin_file:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", "-S", CHILD, json.dumps(cfg)], stdin=stdin_file,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=_clean_env(work),
                                    start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        status, out, err = _collect(proc, start + limits.timeout_s, limits.output_bytes)
        wall = time.monotonic() - start
        if proc.returncode is None:  # deadline or output cap: the whole tree dies (and the report pipe closes)
            _kill_tree(proc)
        report = _read_report(report_r)
        if report:
            report.update(confinement_of(report, layers))
        if report.get("refused"):
            raise SandboxUnavailable(refusal_message(report))
        if status is None:
            rc = proc.returncode
            status = "ok" if rc == 0 else ("sandbox_error" if rc == 125 and not report else "error")
        return RunResult(status, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                         wall, report)
    finally:
        if proc is not None and proc.returncode is None:  # an error on our side
            _kill_tree(proc)
        if cgroup:
            _remove_cgroup(cgroup)
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str | None, bytes, bytes]:
    """Read stdout/stderr until both close and the launcher exits (then it is reaped); a status when the deadline
    or the output cap comes first (then the caller kills the tree)."""
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    status = None
    try:
        while sel.get_map() and status is None:
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
        if status is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"
    finally:
        sel.close()
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


# ---- the verdict ------------------------------------------------------------------------------------------------

def confinement_of(report: dict, layers: list[str]) -> dict:
    """Level, the layers in force per concern, and what is missing (with the kernel's reasons)."""
    verdict = _verdict(report)
    processes = (["pid-namespace"] if report.get("namespaces") else ["subreaper"]) + \
        (["cgroup"] if report.get("cgroup") else []) + ["process-tree-kill"]

    def why(layer: str, error_key: str, absent: str) -> str:
        if layer not in layers:
            return f"{layer}: disabled (isolation={'+'.join(layers) or 'none'})"
        return f"{layer}: {report.get(error_key) or absent}"

    ns = why("namespaces", "namespaces_error", "unavailable")
    missing = []
    if not verdict["filesystem"]:
        ro = (report.get("readonly_error") or "failed") if report.get("namespaces") else ns
        missing.append(f"filesystem confinement ({why('landlock', 'landlock_error', 'not enabled in this kernel')}; "
                       f"read-only mount: {ro})")
    if not verdict["network"]:
        missing.append(f"network isolation ({ns}; {why('seccomp', 'seccomp_error', 'unavailable')})")
    return {**verdict, "processes": processes, "missing": missing}


def refusal_message(conf: dict) -> str:
    return (f"code sandbox refused: this machine gives no {' and no '.join(conf['missing'])}. Model-written code "
            "would run with the evaluator's file and network access. Fix: allow unprivileged user namespaces "
            "(sysctl user.max_user_namespaces>0, kernel.unprivileged_userns_clone=1, "
            "kernel.apparmor_restrict_unprivileged_userns=0) or use a kernel with Landlock and seccomp; or accept "
            f"the risk with {FLAG} (a3po eval) / SandboxLimits(allow_weak=True), recorded in the results")


_CONFINEMENT: dict[str, dict] = {}


def confinement(isolation: str | None = None) -> dict:
    """What this machine gives the sandbox: {"level": "strong"|"weak", "filesystem": [...], "network": [...],
    "processes": [...], "missing": [...]} plus the launcher's raw report (namespaces, landlock_abi, ...).
    Probed once per isolation setting by running an empty program."""
    key = isolation or DEFAULT_ISOLATION
    if key not in _CONFINEMENT:
        _CONFINEMENT[key] = run_python("pass", limits=SandboxLimits(timeout_s=30, allow_weak=True),
                                       isolation=key).isolation
    return dict(_CONFINEMENT[key])


def require_confinement(allow_weak: bool, isolation: str | None = None) -> dict:
    """confinement() with the policy applied: raises SandboxUnavailable (naming what is missing and the flag)
    when it is weak and `allow_weak` is off; else returns it with "allow_weak" recorded."""
    conf = confinement(isolation)
    if not conf:
        raise SandboxUnavailable("code sandbox refused: the sandbox launcher failed to start on this machine")
    if conf["level"] != "strong" and not allow_weak:
        raise SandboxUnavailable(refusal_message(conf))
    return {**conf, "allow_weak": allow_weak, "refused": False}


def describe(conf: dict) -> str:
    """One line for logs and the eval table."""
    def layers(name):
        return " + ".join(conf.get(name) or ["none"])

    summary = (f"filesystem: {layers('filesystem')}; network: {layers('network')}; "
               f"processes: {layers('processes')}")
    if conf.get("level") == "strong":
        return f"code sandbox: strong ({summary})"
    return (f"WARNING: code runs in a WEAK sandbox ({FLAG}): {summary}; missing {'; '.join(conf.get('missing', []))}"
            "; an audit hook is added (defence in depth, not confinement)")


def isolation_report() -> dict:
    """Backward-compatible name of confinement()."""
    return confinement()
