"""Sandbox launcher: started by sandbox.py as `python -I -S _sandbox_child.py CONFIG_JSON`. Standard library only,
single-threaded (it forks and execs). It stays as the supervisor; its child applies the layers asked for
(cfg["layers"]) that the kernel allows, reports them on the report fd and execs the program:
  1. namespaces (user, net, mount, PID, IPC, UTS): no network but a down loopback, a fresh /proc, every mount
     read-only but the work dir, and the program is pid 1 (every process dies with it);
  2. Landlock: writes only beneath the work dir, reads/executes only the interpreter, system libraries and the
     work dir; ABI >= 4 no TCP bind/connect, ABI >= 6 no abstract unix sockets or signals outside the sandbox;
  3. seccomp: no socket() (no network, no host unix socket such as docker.sock), stream socketpairs only, no
     io_uring, ptrace, process_vm_*, bpf, perf events, userfaultfd or keyrings;
  4. rlimits, no_new_privs and SECBIT_NOROOT (no capability survives the exec).
Strong = filesystem confinement (Landlock or the read-only mount) AND network isolation (network namespace or
seccomp). Anything weaker runs only with cfg["allow_weak"], and then under AUDIT_PRELUDE too; otherwise the
child refuses before the program starts. Without a PID namespace the supervisor is a child subreaper and kills
every leftover process when the program exits; the program gets SIGKILL if the supervisor dies (PDEATHSIG).
"""

import ctypes
import errno
import json
import os
import resource
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 0x1000, 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 28, 36, 38
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
# Same numbers on x86_64 and arm64.
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 442, 444, 445, 446
# Landlock filesystem rights (uapi/linux/landlock.h).
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
WRITE_RIGHTS_V1 = sum(1 << i for i in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
# seccomp: (AUDIT_ARCH, denied syscalls, socketpair). Denied: socket ptrace process_vm_readv process_vm_writev
# io_uring_setup bpf perf_event_open userfaultfd add_key request_key keyctl.
SECCOMP_ARCH = {"x86_64": (0xC000003E, (41, 101, 310, 311, 425, 321, 298, 323, 248, 249, 250), 53),
                "aarch64": (0xC00000B7, (198, 117, 270, 271, 425, 280, 241, 282, 217, 218, 219), 199)}

# The weak fallback's audit hook (runs before main.py). Defence in depth, not confinement: C extensions, threads
# racing the checks and interpreter bugs get around it. Every reference it uses is captured before the program
# runs, and the introspection that could reach or alter it (frames, gc, code objects, tracing) is refused.
AUDIT_PRELUDE = r"""
def _a3po_guard(root, reads):
    import builtins as b, os, posix
    # Locals, not global look-ups: the program may replace builtins, os functions and os.stat_result properties.
    type, any, str, bytes, int, bool, PermissionError = b.type, b.any, b.str, b.bytes, b.int, b.bool, b.PermissionError
    lstat, readlink, item, IFMT, O_DIRECTORY = os.lstat, os.readlink, b.tuple.__getitem__, 0o170000, os.O_DIRECTORY
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    reads = tuple(reads) + (root, "/proc/" + readlink("/proc/self"), "/dev/null", "/dev/zero", "/dev/urandom",
                            "/dev/random")
    writes = (root, "/dev/null")
    deny = frozenset(("os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "pty.spawn",
        "subprocess.Popen", "_posixsubprocess.fork_exec", "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir",
        "resource.prlimit", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
        "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__"))
    frames = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))  # a frame of the hook leads to its cells
    deny_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "posix", "_testcapi", "_testinternalcapi",
                              "_xxsubinterpreters", "_xxinterpchannels", "_cffi_backend", "cffi"))
    # path arguments and dir_fd arguments per event (see CPython's audit event table)
    paths = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)),
             "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()),
             "os.removexattr": ((0,), ()), "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
             "os.symlink": ((1,), (2,))}
    for name in ("mkfifo", "mknod", "pidfd_open", "unshare", "setns"):  # no audit events: removed instead
        posix.__dict__.pop(name, None)
        os.__dict__.pop(name, None)

    def real(p, base=root):  # os.path.realpath from captured primitives (the program may monkeypatch os.path)
        if type(p) is bytes:
            p = bytes.decode(p, "utf-8", "surrogateescape")
        elif type(p) is int:
            p = "/proc/self/fd/%d" % p
        if type(p) is not str:
            raise PermissionError("sandbox: file names must be str or bytes")
        todo, parts, hops = (p if p[:1] == "/" else base + "/" + p).split("/")[::-1], [], 0
        while todo:
            c = todo.pop()
            if c in ("", "."):
                continue
            if c == "..":
                parts = parts[:-1]
                continue
            here = "/" + "/".join(parts + [c])
            try:
                link = item(lstat(here), 0) & IFMT == 0o120000
            except OSError:
                link = False
            if not link:
                parts.append(c)
                continue
            hops += 1
            if hops > 40:
                raise PermissionError("sandbox: too many symbolic links")
            target = readlink(here)
            parts = [] if target[:1] == "/" else parts
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(parts)

    def check(event, path, write, base=root):
        p = real(path, base)
        if not any(p == d or p.startswith(d + "/") for d in (writes if write else reads)):
            what = "writing" if write else "reading"
            raise PermissionError(f"sandbox: {event}: {what} {p} outside the work dir is not allowed")
        return p

    def name(x):  # exact str only: a subclass's __eq__/__hash__ would run the program's code inside the hook
        if type(x) is not str:
            raise PermissionError("sandbox: names must be plain str here")
        return x

    def hook(event, args):
        if event in deny or event.startswith(("socket.", "ctypes.", "sys.monitoring")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and str.partition(name(args[0]), ".")[0] in deny_imports:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if (event == "object.__getattr__" and name(args[1]) in frames) or \
                (event == "object.__setattr__" and name(args[1]) == "__code__"):
            raise PermissionError(f"sandbox: {event} {args[1]} is not allowed")
        if event == "open" and type(args[0]) is not int:  # an int wraps an already open fd
            write = bool((args[2] or 0) & WRITE) or any(c in name(args[1] or "") for c in "wax+")
            p = check(event, args[0], write)
            try:  # no directory fds: os.open's audit event hides dir_fd, so relative paths could go anywhere
                isdir = item(lstat(p), 0) & IFMT == 0o040000
            except OSError:
                isdir = False
            if isdir or (args[2] or 0) & O_DIRECTORY:
                raise PermissionError(f"sandbox: opening the directory {p} is not allowed")
        elif event in ("os.listdir", "os.scandir") and args[0] is not None:
            check(event, args[0], False)
        elif event in paths:
            where, dir_fds = paths[event]
            if any(args[i] not in (None, -1) for i in dir_fds):
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for i in where:
                check(event, args[i], True)
            if event == "os.symlink":  # the link's target, seen from the link's directory, must stay inside too
                check(event, args[0], True, str.rpartition(real(args[1]), "/")[0])

    import sys
    sys.addaudithook(hook)

import runpy, sys
_a3po_guard(ROOT, READS)
del _a3po_guard
sys.argv = [sys.argv[0]]
runpy.run_path("main.py", run_name="__main__")
"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg2: int = 0) -> int:
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def _mount(src, target, fstype, flags):
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                       None), f"mount {target}")


def _buf(fmt: str, *values) -> ctypes.Array:
    """A kernel struct, packed with `struct` (formats follow the uapi headers)."""
    return ctypes.create_string_buffer(struct.pack(fmt, *values))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def confinement(report: dict) -> dict:
    """What a launcher report amounts to. Strong = filesystem confinement and network isolation."""
    fs = [name for name, on in (("landlock", report.get("landlock_abi", 0) >= 1),
                                ("readonly-mount", report.get("readonly_root"))) if on]
    net = [name for name, on in (("network-namespace", report.get("namespaces")), ("seccomp", report.get("seccomp")))
           if on]
    return {"level": "strong" if fs and net else "weak", "filesystem": fs, "network": net}


def process_tree() -> dict[int, list[int]]:
    """ppid -> live (non-zombie) children, from one pass over /proc."""
    tree: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if state not in (b"Z", b"X"):
            tree.setdefault(int(ppid), []).append(int(name))
    return tree


def enter_namespaces() -> None:
    uid, gid = os.geteuid(), os.getegid()
    os.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")  # same id inside: files keep their owners
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def cap_pids(nproc: int) -> int | None:
    """The PID namespace's pid_max (Linux >= 6.14; minimum 301) caps processes: RLIMIT_NPROC exempts uid 0."""
    try:
        _write("/proc/sys/kernel/pid_max", str(max(301, nproc)))
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return None


def _mount_setattr(path: str, set_: int, clear: int, flags: int) -> None:
    attr = _buf("<4Q", set_, clear, 0, 0)  # struct mount_attr: attr_set, attr_clr, propagation, userns_fd
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(), ctypes.c_uint(flags),
                         attr, ctypes.c_size_t(32)), f"mount_setattr {path}")


def setup_mounts(cfg: dict, report: dict) -> None:
    """A /proc of the new PID namespace (refused where the host's /proc is partly masked, e.g. containers; the user
    namespace still hides other processes' environ), then every mount read-only (Linux >= 5.12) but a bind mount
    of the work dir; inherited mounts stay locked read-only, even from a nested user namespace."""
    work = cfg["work_dir"]
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        report["readonly_error"] = str(exc)
        return
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        report["private_proc"] = True
        report["pid_max"] = cap_pids(cfg["nproc"])
    except OSError:
        report["private_proc"] = False
    try:
        _mount(work, work, None, MS_BIND | MS_REC)
        _mount_setattr("/", MOUNT_ATTR_RDONLY, 0, AT_RECURSIVE)
        _mount_setattr(work, 0, MOUNT_ATTR_RDONLY, 0)
        os.chdir(work)  # the old cwd is the directory under the bind mount, on the read-only file system
        report["readonly_root"] = True
    except OSError as exc:
        report["readonly_error"] = str(exc)


def set_limits(cfg: dict) -> None:
    def lim(kind, soft, hard=None):
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
    lim(resource.RLIMIT_AS, cfg["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    lim(resource.RLIMIT_NOFILE, cfg["nofile"])
    lim(resource.RLIMIT_NPROC, cfg["nproc"])


def landlock(cfg: dict, private_proc: bool) -> int:
    """Restrict this process and its descendants; returns the Landlock ABI used (0: unavailable). With the host's
    /proc, only the program's own entry: other processes' cmdlines are readable without ptrace rights."""
    abi = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    write = WRITE_FILE | WRITE_RIGHTS_V1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    read = EXECUTE | READ_FILE | READ_DIR
    handled = write | read | (IOCTL_DEV if abi >= 5 else 0)
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (TCP bind+connect), scoped (unix+signal)
    attr = _buf("<3Q", handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE), attr, ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    file_rights = EXECUTE | READ_FILE | WRITE_FILE | (TRUNCATE if abi >= 3 else 0)

    def allow(path: str, rights: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # absent on this system
        if not os.path.isdir(path):
            rights &= file_rights
        rule = _buf("<Qi", rights, fd)  # struct landlock_path_beneath_attr (packed): allowed_access, parent_fd
        _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1), rule,
                             ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(fd)

    allow(cfg["work_dir"], handled)
    # "/proc/self" is opened, so the rule names this process's entry as the host /proc numbers it
    proc = ["/proc"] if private_proc else ["/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat"]
    for path in [p for p in cfg["read_paths"] if p != "/proc"] + proc:
        allow(path, read)
    for dev in ("/dev/null", "/dev/zero", "/dev/full"):
        allow(dev, READ_FILE | WRITE_FILE)
    for dev in ("/dev/urandom", "/dev/random"):
        allow(dev, READ_FILE)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(ruleset)
    return abi


def seccomp() -> None:
    """A classic-BPF filter (needs no_new_privs): EPERM for the syscalls in SECCOMP_ARCH and for socketpair()
    other than AF_UNIX/SOCK_STREAM; other ABIs (x32, 32-bit) get EPERM for everything."""
    machine = os.uname().machine
    if machine not in SECCOMP_ARCH:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {machine}")
    arch, denied, socketpair = SECCOMP_ARCH[machine]
    LD, JEQ, JGE, AND, RET = 0x20, 0x15, 0x35, 0x54, 0x06
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, DENY), (LD, 0, 0, 0)]  # arch, then syscall number
    if machine == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, DENY)]  # x32 numbering
    for nr in denied:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, DENY)]
    prog += [(JEQ, 0, 7, socketpair), (LD, 0, 0, 16), (JEQ, 0, 3, 1),  # args[0] == AF_UNIX
             (LD, 0, 0, 24), (AND, 0, 0, 0xF), (JEQ, 1, 0, 1),  # args[1] & SOCK_TYPE_MASK == SOCK_STREAM
             (RET, 0, 0, DENY), (RET, 0, 0, ALLOW), (RET, 0, 0, ALLOW)]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *insn) for insn in prog))  # sock_filter[]
    fprog = _buf("HP", len(prog), ctypes.addressof(filters))  # struct sock_fprog: len, filter (native alignment)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(NO_NEW_PRIVS)")
    _check(_libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(2), fprog, ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "prctl(PR_SET_SECCOMP)")


def run_program(cfg: dict, report: dict, report_fd: int) -> None:
    """In the final process: Landlock, seccomp, the verdict, limits, exec. Never returns."""
    layers = cfg["layers"]
    if "landlock" in layers:
        try:
            report["landlock_abi"] = landlock(cfg, bool(report.get("private_proc")))
        except OSError as exc:
            report["landlock_error"] = str(exc)
    # After exec the program keeps no capability (root inside the user namespace would regain them).
    report["noroot"] = _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED) == 0
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if "seccomp" in layers:
        try:
            seccomp()
            report["seccomp"] = True
        except OSError as exc:
            report["seccomp_error"] = str(exc)
    weak = confinement(report)["level"] != "strong"
    report["audit_hook"] = weak
    report["refused"] = weak and not cfg["allow_weak"]
    os.write(report_fd, json.dumps(report).encode())
    os.close(report_fd)
    if report["refused"]:
        os._exit(125)
    set_limits(cfg)  # last: the limits must not break the setup above
    if weak:
        prelude = AUDIT_PRELUDE.replace("ROOT, READS", f"{cfg['work_dir']!r}, {cfg['audit_reads']!r}")
        argv = [cfg["python"], "-I", "-c", prelude]
    else:
        argv = [cfg["python"], "-I", "main.py"]
    os.execv(cfg["python"], argv)


def reap_all(program: int) -> int:
    """Supervisor: reap until the program exits, then SIGKILL and reap every leftover child (a subreaper
    inherits the program's orphans, setsid or not). Returns the program's wait status."""
    status = None
    while status is None:
        pid, st = os.waitpid(-1, 0)
        status = st if pid == program else None
    while True:
        for pid in process_tree().get(os.getpid(), ()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                os.sched_yield()
        except ChildProcessError:
            return status


def main() -> None:
    cfg = json.loads(sys.argv[1])
    report_fd = cfg["report_fd"]
    report = {"namespaces": False}
    if cfg.get("cgroup"):
        try:  # before unshare: the user namespace would lose the right to move us
            _write(os.path.join(cfg["cgroup"], "cgroup.procs"), str(os.getpid()))
            report["cgroup"] = True
        except OSError as exc:
            report["cgroup_error"] = str(exc)
    if "namespaces" in cfg["layers"]:
        try:
            enter_namespaces()
            report["namespaces"] = True
        except OSError as exc:
            report["namespaces_error"] = str(exc)
    if not report["namespaces"]:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    supervisor = os.getpid()
    pid = os.fork()  # with namespaces the child is pid 1 of the new PID namespace: the rest die with it
    if pid == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if not report["namespaces"] and os.getppid() != supervisor:
                os._exit(125)  # the supervisor died before PDEATHSIG was set
            if report["namespaces"]:
                setup_mounts(cfg, report)
            run_program(cfg, report, report_fd)
        finally:
            os._exit(125)
    os.close(report_fd)
    status = reap_all(pid)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
