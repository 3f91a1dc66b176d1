"""Sandbox launcher: started by sandbox.py as `python -I -S _sandbox_child.py CONFIG_JSON`, it confines itself and
then execs the untrusted program. Standard library only, single-threaded (it forks and execs).

Layers, strongest first, each applied when the kernel allows it and reported on the report fd:
  1. user + network + mount + PID + IPC + UTS namespaces: no network interface but a down loopback, a fresh
     /proc that shows only the sandbox's processes, and the whole process tree dies with the program (pid 1);
  2. Landlock: writes only beneath the work dir, reads/executes only the interpreter, system libraries and the
     work dir, no TCP bind/connect, no abstract unix sockets or signals outside the sandbox;
  3. rlimits: CPU seconds, address space, file size, processes/threads, open files, no core dumps (uid 0 is
     exempt from the process limit, so the PID namespace's pid_max caps processes there);
  4. no_new_privs and SECBIT_NOROOT: the program gains no capabilities from exec.
Without namespaces and Landlock, the "audit" fallback runs the program under a Python audit hook (weaker: a
program using ctypes can get around it); sandbox.py documents which layers applied.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS = 38, 28
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446  # same on x86_64 and arm64
# Landlock filesystem rights (uapi/linux/landlock.h).
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
WRITE_RIGHTS_V1 = sum(1 << i for i in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
# Python's audit-hook fallback: the program runs after this prelude (no namespaces, no Landlock).
AUDIT_PRELUDE = r"""
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_BLOCKED = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
            "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"}
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) >= 3 and isinstance(args[0], (str, bytes)):
        mode, flags = args[1] or "", args[2] or 0
        writing = any(c in str(mode) for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        path = os.path.realpath(os.fsdecode(args[0]))
        if writing and path != os.devnull and not (path + os.sep).startswith(_ROOT + os.sep):
            raise PermissionError(f"sandbox: writing {path} outside the work dir is not allowed")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "os.link",
                 "shutil.rmtree", "os.truncate", "os.chown", "os.utime"):
        path = args[0] if args else None
        if isinstance(path, (str, bytes)):
            path = os.path.realpath(os.fsdecode(path))
            if not (path + os.sep).startswith(_ROOT + os.sep):
                raise PermissionError(f"sandbox: {event} on {path} outside the work dir is not allowed")
sys.addaudithook(_hook)
del _hook
import runpy
sys.argv = [sys.argv[0]]
runpy.run_path("main.py", run_name="__main__")
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _mount(src, target, fstype, flags):
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                       None), f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces() -> None:
    uid, gid = os.geteuid(), os.getegid()
    os.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")  # same id inside: files keep their owners
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def mount_private_proc() -> bool:
    """A /proc of the new PID namespace (only the sandbox's processes). Refused where the host's /proc is
    partly masked (containers); then the host /proc stays, and Landlock's ptrace scoping guards other processes."""
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return True
    except OSError:
        return False


def cap_pids(nproc: int) -> int | None:
    """RLIMIT_NPROC does not bind uid 0 (kernel exemption for INIT_USER), and the interpreter may live where only
    root can read it; so the PID namespace's own pid_max (Linux >= 6.14; minimum 301) caps the process count."""
    try:
        _write("/proc/sys/kernel/pid_max", str(max(301, nproc)))
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return None


def set_limits(cfg: dict) -> None:
    def lim(kind, soft, hard=None):
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
    lim(resource.RLIMIT_AS, cfg["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    lim(resource.RLIMIT_NOFILE, cfg["nofile"])
    lim(resource.RLIMIT_NPROC, cfg["nproc"])


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(cfg: dict) -> int:
    """Restrict this process and its descendants; returns the Landlock ABI used (0: unavailable)."""
    _libc.syscall.restype = ctypes.c_long
    abi = _libc.syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    write = WRITE_FILE | WRITE_RIGHTS_V1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    read = EXECUTE | READ_FILE | READ_DIR
    handled = write | read | (IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # TCP bind+connect; unix+signal
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    file_rights = EXECUTE | READ_FILE | WRITE_FILE | (TRUNCATE if abi >= 3 else 0)

    def allow(path: str, rights: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # absent on this system
        if not os.path.isdir(path):
            rights &= file_rights
        rule = _PathBeneath(rights, fd)
        _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                             ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(fd)

    allow(cfg["work_dir"], handled)
    for path in cfg["read_paths"]:
        allow(path, read)
    for dev in ("/dev/null", "/dev/zero", "/dev/full"):
        allow(dev, READ_FILE | WRITE_FILE)
    for dev in ("/dev/urandom", "/dev/random"):
        allow(dev, READ_FILE)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(SYS_LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def run_program(cfg: dict, report: dict, report_fd: int) -> None:
    """In the final process: limits, Landlock, report, exec. Never returns."""
    if cfg["isolation"] == "auto":
        try:
            report["landlock_abi"] = landlock(cfg)
        except OSError as exc:
            report["landlock_error"] = str(exc)
    # After exec the program keeps no capability (root inside the user namespace would regain them).
    report["noroot"] = _libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0) == 0
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    audit = cfg["isolation"] == "audit" or not (report.get("namespaces") or report.get("landlock_abi"))
    report["audit_hook"] = audit
    os.write(report_fd, json.dumps(report).encode())
    os.close(report_fd)
    set_limits(cfg)  # last: the limits must not break the setup above
    argv = [cfg["python"], "-I", "-c", AUDIT_PRELUDE] if audit else [cfg["python"], "-I", "main.py"]
    os.execv(cfg["python"], argv)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    report_fd = cfg["report_fd"]
    report = {"namespaces": False}
    if cfg["isolation"] == "auto":
        try:
            enter_namespaces()
            report["namespaces"] = True
        except OSError as exc:
            report["namespaces_error"] = str(exc)
    if not report["namespaces"]:
        try:
            run_program(cfg, report, report_fd)
        finally:
            os._exit(125)
    pid = os.fork()  # the child is pid 1 of the new PID namespace: when it exits, the kernel kills the rest
    if pid == 0:
        try:
            report["private_proc"] = mount_private_proc()
            report["pid_max"] = cap_pids(cfg["nproc"]) if report["private_proc"] else None
            run_program(cfg, report, report_fd)
        finally:
            os._exit(125)
    os.close(report_fd)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
