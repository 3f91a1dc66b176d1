"""The code sandbox contains hostile programs: each is killed or refused, scores 0, and the evaluator goes on.

Run on the strongest isolation this kernel gives ("auto") and on the documented audit-hook fallback.
"""

import os
import socket
import time

import pytest

from megatron_a3po.evaluation.sandbox import SandboxLimits, isolation_report, run_python
from megatron_a3po.evaluation.tasks import EvalItem, score_code

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=512)
SECRET = "a3po-fake-secret-value"


def _item(output="1\n"):
    return EvalItem("code", "p", [{"input": "1\n", "output": output}])


def _respond(code):
    return f"Here is my solution.\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    yield server
    server.close()


@pytest.fixture(params=["auto", "audit"])
def isolation(request):
    return request.param


def _run(code, isolation, stdin="1\n"):
    start = time.monotonic()
    result = run_python(code, stdin, LIMITS, isolation=isolation)
    assert time.monotonic() - start < LIMITS.timeout_s + 5  # never hangs
    return result


def test_correct_program_scores_one(isolation):
    assert _run("print(int(input()))", isolation).stdout == "1\n"
    assert score_code(_respond("print(int(input()))"), _item(), LIMITS) == 1.0
    assert score_code(_respond("print(2)"), _item(), LIMITS) == 0.0  # wrong answer


def test_strongest_isolation_is_reported():
    report = isolation_report()
    if not report.get("namespaces"):
        pytest.skip(f"this kernel gives no user namespaces: {report}")
    assert report["landlock_abi"] >= 1 and not report["audit_hook"]


@pytest.mark.parametrize("name,code", [
    ("infinite_loop", "while True: pass"),
    ("sleep", "import time; time.sleep(1000)"),
    ("fork_bomb", "import os\nwhile True:\n    try: os.fork()\n    except Exception: pass"),
    ("alloc_4gib", "x = bytearray(4 << 30); print(1)"),
    ("output_flood", "while True: print('y' * 4096)"),
])
def test_runaway_programs_are_killed(name, code, isolation):
    result = _run(code, isolation)
    assert not result.ok, result
    assert score_code(_respond(code), _item(), LIMITS) == 0.0


def test_no_writing_outside_the_work_dir(isolation, tmp_path):
    target = tmp_path / "escape.txt"
    result = _run(f"open({str(target)!r}, 'w').write('x'); print(1)", isolation)
    assert not result.ok and not target.exists()
    assert _run("open('own.txt', 'w').write('ok'); print(open('own.txt').read())", isolation).stdout == "ok\n"


def test_no_environment_secrets(isolation, monkeypatch):
    monkeypatch.setenv("A3PO_FAKE_SECRET", SECRET)
    code = ("import os\nprint(os.environ.get('A3PO_FAKE_SECRET'))\n"
            "try:\n    print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\nexcept Exception as e:\n"
            "    print('denied')\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept Exception as e:\n"
            "    print('denied')")
    result = _run(code, isolation)
    assert SECRET not in result.stdout and result.stdout.startswith("None\n"), result.stdout
    leak = "import os; print(os.environ.get('A3PO_FAKE_SECRET', 'none'))"
    assert score_code(_respond(leak), _item(SECRET + "\n"), LIMITS) == 0.0


def test_no_network(isolation, listener):
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint(1)"
    result = _run(code, isolation)
    assert not result.ok and result.stdout == ""
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever connected
    assert score_code(_respond(code), _item(), LIMITS) == 0.0


def test_temp_dirs_are_removed():
    import tempfile

    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("a3po-sandbox-")}
    _run("open('big', 'w').write('z' * 1000); print(1)", "auto")
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("a3po-sandbox-")}
    assert after <= before
