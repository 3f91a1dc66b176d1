"""The code sandbox contains hostile programs: each is killed, refused or confined, scores 0, and the evaluator
goes on. It fails closed: without filesystem confinement and network isolation it refuses unless weak isolation
is allowed, and then says so.

MODES run the same programs on subsets of the layers, so every level is exercised whatever this kernel gives:
"auto" (all), "none" (the audit-hook fallback only: weak), "landlock+seccomp+cgroup" (no namespaces: no PID
namespace, the subreaper and cgroup kill the tree), "namespaces+seccomp" (the read-only mount, no Landlock).
Each test asserts what the level this machine actually reached must give.
"""

import ctypes
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from megatron_a3po.evaluation import sandbox
from megatron_a3po.evaluation.sandbox import (SandboxLimits, SandboxUnavailable, confinement, describe,
                                              require_confinement, run_python)
from megatron_a3po.evaluation.tasks import EvalItem, score_code

LIMITS = SandboxLimits(timeout_s=10.0, memory_mb=512, allow_weak=True)  # a bound: these programs end at once
RUNAWAY = SandboxLimits(timeout_s=2.0, memory_mb=512, allow_weak=True)  # these are killed at the deadline
SECRET = "a3po-fake-secret-value"
MODES = ["auto", "none", "landlock+seccomp+cgroup", "namespaces+seccomp"]


def _item(output="1\n"):
    return EvalItem("code", "p", [{"input": "1\n", "output": output}])


def _respond(code):
    return f"Here is my solution.\n```python\n{code}\n```\n"


def _run(code, isolation, stdin="1\n", limits=LIMITS):
    start = time.monotonic()
    result = run_python(code, stdin, limits, isolation=isolation)
    assert time.monotonic() - start < limits.timeout_s + 5  # never hangs
    return result


@pytest.fixture(scope="module")
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    yield server
    server.close()


@pytest.fixture(params=["auto", "none"])
def isolation(request):
    return request.param


# ---- the verdict and the policy -----------------------------------------------------------------------------------

def _kernel_offers() -> dict:
    """Independent probes: Landlock ABI, user+net namespaces (in a throwaway process), seccomp."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = max(0, libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    probe = "import os; os.unshare(0x10000000 | 0x40000000)"  # CLONE_NEWUSER | CLONE_NEWNET
    userns = subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    with open("/proc/self/status") as f:
        seccomp = "Seccomp:" in f.read() and os.uname().machine in ("x86_64", "aarch64")
    return {"landlock_abi": abi, "userns": userns, "seccomp": seccomp}


def test_confinement_level_matches_the_kernel():
    conf, kernel = confinement(), _kernel_offers()
    print(describe(conf), kernel)
    assert ("landlock" in conf["filesystem"]) == (kernel["landlock_abi"] >= 1)
    assert conf.get("landlock_abi", 0) == kernel["landlock_abi"]
    assert conf["namespaces"] == kernel["userns"] and ("network-namespace" in conf["network"]) == kernel["userns"]
    assert ("seccomp" in conf["network"]) == kernel["seccomp"]
    strong = bool(conf["filesystem"]) and bool(conf["network"])
    assert conf["level"] == ("strong" if strong else "weak") and conf["audit_hook"] == (not strong)
    assert bool(conf["missing"]) == (not strong)
    assert describe(conf).startswith("code sandbox: strong" if strong else "WARNING: code runs in a WEAK sandbox")
    if strong:
        assert require_confinement(False)["level"] == "strong"
    else:
        with pytest.raises(SandboxUnavailable, match="--allow-weak-sandbox"):
            require_confinement(False)


def test_weak_sandbox_refused_without_the_flag_and_reported_with_it():
    strict = SandboxLimits(timeout_s=10)
    with pytest.raises(SandboxUnavailable, match="filesystem confinement.*network isolation.*--allow-weak-sandbox"):
        run_python("print(1)", "", strict, isolation="none")
    with pytest.raises(SandboxUnavailable, match="--allow-weak-sandbox"):
        require_confinement(False, isolation="none")
    conf = require_confinement(True, isolation="none")
    assert conf["level"] == "weak" and conf["allow_weak"] and conf["audit_hook"]
    assert "WEAK" in describe(conf) and "filesystem: none" in describe(conf)
    result = run_python("print(int(input()) + 1)", "1\n", LIMITS, "none")
    assert result.stdout == "2\n" and result.isolation["level"] == "weak" and result.isolation["audit_hook"]
    if confinement("landlock")["filesystem"]:  # Landlock alone: files confined, the network is not
        with pytest.raises(SandboxUnavailable) as info:
            run_python("print(1)", "", strict, isolation="landlock")
        assert "network isolation" in str(info.value) and "filesystem confinement" not in str(info.value)


def test_cli_refuses_a_weak_sandbox_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from megatron_a3po.evaluation.cli import run

    monkeypatch.setattr(sandbox, "DEFAULT_ISOLATION", "none")  # as on a kernel without any layer
    monkeypatch.setattr(sandbox, "_CONFINEMENT", {})
    (tmp_path / "config.json").write_text("{}")  # never loaded: the refusal comes first
    bench = tmp_path / "code.jsonl"
    bench.write_text('{"question": "echo", "tests": [{"input": "1", "output": "1"}]}\n')
    argv = ["--model", str(tmp_path), "--benchmark", f"c={bench}:code", "--output", str(tmp_path / "r.json")]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "code sandbox refused" in err and "--allow-weak-sandbox" in err and "network isolation" in err


def test_correct_program_scores_one(isolation):
    assert _run("print(int(input()))", isolation).stdout == "1\n"
    assert score_code(_respond("print(int(input()))"), _item(), LIMITS) == 1.0
    assert score_code(_respond("print(2)"), _item(), LIMITS) == 0.0  # wrong answer


@pytest.mark.parametrize("name,code", [
    ("infinite_loop", "while True: pass"),
    ("sleep", "import time; time.sleep(1000)"),
    ("fork_bomb", "import os\nwhile True:\n    try: os.fork()\n    except Exception: pass"),
    ("alloc_4gib", "x = bytearray(4 << 30); print(1)"),
    ("output_flood", "while True: print('y' * 4096)"),
])
def test_runaway_programs_are_killed(name, code, isolation):
    result = _run(code, isolation, limits=RUNAWAY)
    assert not result.ok, result
    assert score_code(_respond(code), _item(), RUNAWAY) == 0.0


# Prelude of the probe programs below: try one thing, print whether it went through.
ATTEMPT = r"""
def attempt(name, f):
    try:
        f()
        print(name, "done")
    except BaseException as e:
        print(name, "blocked", type(e).__name__)
"""

# ---- escapes: each is refused or contained at every level -----------------------------------------------------------

ESCAPES = ATTEMPT + r"""
import os
open("own", "w").write("mine")
attempt("rename", lambda: os.rename("own", OUT + "/renamed"))
open("own2", "w").write("mine")
attempt("replace", lambda: os.replace("own2", OUT + "/replaced"))
attempt("link_out", lambda: os.link("own", OUT + "/linked"))
attempt("link_in", lambda: (os.link(OUT + "/victim", "v"), open("v", "w").write("pwned")))
attempt("trunc", lambda: os.close(os.open(OUT + "/victim", os.O_RDONLY | os.O_TRUNC)))
attempt("append", lambda: os.write(os.open(OUT + "/victim", os.O_RDONLY | os.O_APPEND), b"pwned"))
attempt("symlink", lambda: (os.symlink(OUT + "/victim", "s"), open("s", "w").write("pwned")))
attempt("mkdir", lambda: os.mkdir(OUT + "/dir"))
attempt("write", lambda: open(OUT + "/written", "w").write("x"))
"""


@pytest.mark.parametrize("mode", MODES)
def test_no_writing_outside_the_work_dir(mode, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("intact")
    result = _run(f"OUT = {str(tmp_path)!r}\n" + ESCAPES, mode)
    assert result.ok, result.stderr
    assert victim.read_text() == "intact", result.stdout
    assert sorted(os.listdir(tmp_path)) == ["victim"], result.stdout
    for line in result.stdout.splitlines():
        assert "blocked" in line, result.stdout
    assert _run("open('own.txt', 'w').write('ok'); print(open('own.txt').read())", mode).stdout == "ok\n"


READS = r"""
import os
def attempt(name, path):
    try:
        data = open(path, "rb").read()
        print(name, "read", SECRET.encode() in data)
    except OSError as e:
        print(name, "denied", type(e).__name__)
attempt("file", FILE)
attempt("environ", "/proc/%d/environ" % HOLDER)
attempt("cmdline", "/proc/%d/cmdline" % HOLDER)
attempt("evaluator", "/proc/%d/environ" % EVALUATOR)
attempt("parent", "/proc/%d/environ" % os.getppid())
"""


@pytest.mark.parametrize("mode", MODES)
def test_no_reading_secrets(mode, tmp_path):
    """A file outside the work dir, another process's /proc/PID/environ (one holding a secret in its environment,
    the evaluator, the launcher) and cmdline. Only a read-only mount without Landlock leaves files readable."""
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", SECRET],
                              env={**os.environ, "A3PO_FAKE_SECRET": SECRET})
    try:
        code = (f"SECRET, FILE, HOLDER, EVALUATOR = {SECRET!r}, {str(secret_file)!r}, {holder.pid}, {os.getpid()}\n"
                + READS)
        result = _run(code, mode)
    finally:
        holder.kill()
        holder.wait()
    assert result.ok, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in ("environ", "evaluator", "parent"):
        assert lines[name].startswith("denied") or lines[name] == "read False", result.stdout
    assert lines["environ"].startswith("denied") and lines["evaluator"].startswith("denied"), result.stdout
    conf = result.isolation
    files_readable = conf["level"] == "strong" and "landlock" not in conf["filesystem"]
    assert lines["file"] == "read True" if files_readable else lines["file"].startswith("denied"), result.stdout
    host_proc = files_readable and not conf.get("private_proc")  # a container's masked /proc, no Landlock
    assert lines["cmdline"] == "read True" if host_proc else lines["cmdline"].startswith("denied"), result.stdout


def test_no_environment_secrets(isolation, monkeypatch):
    monkeypatch.setenv("A3PO_FAKE_SECRET", SECRET)
    result = _run("import os\nprint(os.environ.get('A3PO_FAKE_SECRET'))", isolation)
    assert result.stdout == "None\n"
    leak = "import os; print(os.environ.get('A3PO_FAKE_SECRET', 'none'))"
    assert score_code(_respond(leak), _item(SECRET + "\n"), LIMITS) == 0.0


SPAWN = r"""
import os, sys
try:
    import _posixsubprocess
    args = [sys.executable, "-c", "open(%r, 'w').write('x')" % TARGET]
    r, w = os.pipe()
    pid = _posixsubprocess.fork_exec(args, [os.fsencode(sys.executable)], True, (), None, None, -1, -1, -1, -1, -1,
                                     -1, r, w, True, False, -1, None, None, None, -1, None, False)
    print("spawned", os.waitpid(pid, 0)[1])
except BaseException as e:
    print("blocked", type(e).__name__, e)
for name, f in [("posix_spawn", lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "0"], {})),
                ("popen", lambda: __import__("subprocess").run([sys.executable, "-c", "0"]))]:
    try:
        f()
        print(name, "done")
    except BaseException as e:
        print(name, "blocked", type(e).__name__)
"""


@pytest.mark.parametrize("mode", MODES)
def test_spawned_processes_are_confined_or_refused(mode, tmp_path):
    target = tmp_path / "spawned.txt"
    result = _run(f"TARGET = {str(target)!r}\n" + SPAWN, mode)
    assert not target.exists(), result.stdout
    if result.isolation["audit_hook"]:  # the audit layer refuses every way to start a process
        assert result.stdout.splitlines() == ["blocked PermissionError sandbox: importing _posixsubprocess is not "
                                              "allowed", "posix_spawn blocked PermissionError",
                                              "popen blocked PermissionError"], result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_no_network(mode, listener, tmp_path):
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint(1)"
    result = _run(code, mode)
    assert not result.ok and result.stdout == ""
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever connected
    # A host unix socket (docker.sock, say): no network namespace keeps it away, seccomp or the audit hook does.
    path = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    server.settimeout(0.1)
    try:
        result = _run(f"import socket\nsocket.socket(socket.AF_UNIX).connect({path!r})\nprint(1)", mode)
        assert not result.ok and result.stdout == ""
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert score_code(_respond(code), _item(), LIMITS) == 0.0


# ---- every process the program starts dies ----------------------------------------------------------------------

TREE = {
    # the child leaves the session and the process group; the parent sleeps past the deadline
    "setsid_child": "import os, sys, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
                    "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', MARK])\n"
                    "print(pid, flush=True)\ntime.sleep(60)",
    # the program itself leaves its process group (with a PID namespace it is pid 1)
    "setsid_self": "import os, sys\nos.setsid()\nprint(os.getpid(), flush=True)\n"
                   "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', MARK])",
    # a daemon: double fork + setsid, and the program exits at once (normal exit, no timeout)
    "daemon": "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', MARK])\n"
              "    os._exit(0)\nprint(0)",
}


def _alive_with(mark: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if mark.encode() in cmdline and state not in (b"Z", b"X"):
            found.append(int(name))
    return found


@pytest.mark.parametrize("mode", ["auto", "landlock+seccomp+cgroup", "landlock+seccomp", "none"])
@pytest.mark.parametrize("program", sorted(TREE))
def test_no_process_survives(program, mode):
    mark = f"a3po-mark-{uuid.uuid4().hex}"
    result = _run(f"MARK = {mark!r}\n" + TREE[program], mode, limits=SandboxLimits(timeout_s=3, allow_weak=True))
    if result.isolation["audit_hook"]:
        assert "PermissionError" in result.stderr  # the audit layer refuses fork and exec
    elif program == "daemon":
        assert result.ok, result  # the program's exit ends the run (not the deadline): nothing holds stdout
    else:
        assert result.status == "timeout" and result.stdout.strip(), result  # it started its process, then died
    deadline = time.monotonic() + 2
    while _alive_with(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive_with(mark) == [], f"{program} survived the sandbox ({mode})"
    printed = result.stdout.split()
    if printed and printed[0] != "0" and not result.isolation.get("namespaces"):  # host pids: check by pid too
        assert int(printed[0]) not in _alive_with(mark)


# ---- the audit-hook layer cannot be switched off from Python ------------------------------------------------------

TAMPER = ATTEMPT + r"""
import builtins, os, os.path, gc, sys
os.path.realpath = lambda p, **k: os.getcwd() + "/x"  # the hook must not trust os.path
builtins.any = lambda it: True
os.stat_result.st_mode = property(lambda s: 0o100644)  # nor os.stat_result's fields
attempt("write", lambda: open(OUT + "/w", "w").write("x"))
attempt("dirfd", lambda: os.open("/usr", os.O_RDONLY))
attempt("gc", lambda: gc.get_objects())
attempt("frames", lambda: sys._current_frames())
attempt("trace", lambda: sys.settrace(lambda *a: None))
try:
    1 / 0
except ZeroDivisionError as e:
    attempt("tb_frame", lambda: e.__traceback__.tb_frame)
attempt("ctypes", lambda: __import__("ctypes"))
attempt("mkfifo", lambda: os.mkfifo(OUT + "/fifo"))
attempt("pathlike", lambda: open(__import__("pathlib").Path(OUT) / "p", "w"))
attempt("chdir", lambda: os.chdir("/"))
attempt("kill", lambda: os.kill(os.getppid(), 9))
"""


def test_audit_layer_resists_tampering(tmp_path):
    result = _run(f"OUT = {str(tmp_path)!r}\n" + TAMPER, "none")
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 11 and all(" blocked " in line for line in lines), result.stdout
    assert os.listdir(tmp_path) == []


def test_temp_dirs_and_cgroups_are_removed():
    import tempfile

    def leftovers():
        dirs = [tempfile.gettempdir()] + ([sandbox._cgroup_base()] if sandbox._cgroup_base() else [])
        return {os.path.join(d, p) for d in dirs for p in os.listdir(d) if p.startswith("a3po-sandbox-")}

    before = leftovers()
    _run("open('big', 'w').write('z' * 1000); print(1)", "auto")
    _run("import time; time.sleep(100)", "auto", limits=RUNAWAY)
    assert leftovers() <= before
