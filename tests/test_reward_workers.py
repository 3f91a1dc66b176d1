"""Reward workers under infrastructure failures: job-wide signals, a pool that cannot start, workers that die.

Everything runs real worker processes. "math-verify missing" and "a worker that dies" are simulated by a fake
`math_verify` package put first on sys.path (the workers follow the trainer's sys.path), so no test-only hook
exists in the code under test.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO
from megatron_a3po.rewards import (RewardError, WorkerPool, check_reward_fn, get_default_pool, get_reward_fn,
                                   score_batch)

MISSING = "raise ModuleNotFoundError(\"No module named 'math_verify'\", name='math_verify')\n"
DIES = "import os\nos._exit(3)\n"


def _fake_math_verify(tmp_path, monkeypatch, body: str) -> None:
    """Shadow math-verify for worker processes started from now on (this process never imports it)."""
    (tmp_path / "math_verify").mkdir()
    (tmp_path / "math_verify" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))


def _halves(first: int, n: int) -> tuple[list[str], list[str], list[float]]:
    """n distinct answers k/(2k) that need math-verify (no cache hit, no integer shortcut); even items correct."""
    sols = [f"\\boxed{{\\frac{{{k}}}{{{2 * k}}}}}" for k in range(first, first + n)]
    gts = ["0.5" if i % 2 == 0 else "0.25" for i in range(n)]
    return sols, gts, [1.0 if i % 2 == 0 else 0.0 for i in range(n)]


# A "trainer" in its own process group: like guards.py it handles SIGTERM (finishes the step) and SIGINT.
# Mid-batch, a thread signals each worker and the whole process group, as SLURM or Ctrl-C would.
TRAINER = r"""
import json, os, signal, sys, threading, time
from megatron_a3po.rewards import WorkerPool, score_batch

received = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: received.append(signum))
n = 24
sols = [f"\\boxed{{\\frac{{{k}}}{{{2 * k}}}}}" for k in range(3, 3 + n)]
gts = ["0.5" if i % 2 == 0 else "0.25" for i in range(n)]
with WorkerPool(2).start() as pool:
    assert score_batch(["\\boxed{\\frac13}", "\\boxed{\\frac23}"], ["1/3", "2/3"], pool=pool) == [1.0, 1.0]
    pids, warm, sent_at = pool.worker_pids(), pool.stats["calls"], []

    def signal_everyone():
        while pool.stats["calls"] < warm + 2:  # both workers are busy with this batch
            time.sleep(0.001)
        sent_at.append(pool.stats["calls"] - warm)
        for sig in (signal.SIGTERM, signal.SIGINT):
            for pid in pids:
                os.kill(pid, sig)
            os.killpg(0, sig)

    thread = threading.Thread(target=signal_everyone)
    thread.start()
    scores = score_batch(sols, gts, pool=pool)
    thread.join()
    print(json.dumps({"n": n, "scores": scores, "sent_at": sent_at[0], "received": received, "pids": pids,
                      "pids_after": pool.worker_pids(), "stats": pool.stats}))
"""


def test_workers_ignore_job_signals_during_a_batch():
    proc = subprocess.run([sys.executable, "-c", TRAINER], cwd=REPO, capture_output=True, text=True, timeout=180,
                          start_new_session=True)  # its own process group: the group signal stays inside
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n = out["n"]
    assert out["scores"] == [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    assert 2 <= out["sent_at"] < n, f"signals were not sent mid-batch: {out}"  # calls started by then
    assert sorted(set(out["received"])) == [signal.SIGINT, signal.SIGTERM]  # the group signals were delivered
    assert sorted(out["pids_after"]) == sorted(out["pids"]) and len(out["pids"]) == 2
    assert out["stats"]["crashes"] == out["stats"]["restarts"] == out["stats"]["hard_timeouts"] == 0


def test_worker_ignores_signals_from_its_first_instant():
    """Signalled right after spawn, still inside interpreter start-up: signals are blocked until ignored."""
    with WorkerPool(1, preload=()).start() as p:
        [pid] = p.worker_pids()
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        assert p.call("operator:add", [1, 2], timeout=30) == 3
        os.kill(pid, signal.SIGTERM)  # ready and idle
        assert p.call("operator:add", [2, 2], timeout=5) == 4
        assert p.worker_pids() == [pid] and p.stats["crashes"] == 0


def test_pool_that_cannot_start_raises(tmp_path, monkeypatch):
    _fake_math_verify(tmp_path, monkeypatch, MISSING)
    sols, gts, _ = _halves(100, 6)
    with WorkerPool(2) as p:  # preloads math_verify, as the default pool does
        with pytest.raises(RewardError, match=r"failed to start: ModuleNotFoundError: No module named 'math_verify'"
                                              r".*Fix: install math-verify"):
            get_reward_fn("math", pool=p).batch(sols, gts)
        with pytest.raises(RewardError, match="math_verify"):  # the pool stays failed: no silent recovery
            check_reward_fn("math", pool=p)
        assert p.failed and p.stats["restarts"] == 0 and p.worker_pids() == []


def test_verifier_that_cannot_import_raises(tmp_path, monkeypatch):
    """Workers start (nothing preloaded) but the verifier raises ImportError on every item."""
    _fake_math_verify(tmp_path, monkeypatch, MISSING)
    sols, gts, _ = _halves(200, 6)
    with WorkerPool(2, preload=()) as p:
        with pytest.raises(RewardError, match=r"(at least )?[4-6] of 6 rewards in this batch could not be computed.*"
                                              r"No module named 'math_verify'.*Fix: install math-verify"):
            score_batch(sols, gts, pool=p)


def test_workers_dying_on_every_item_raise(tmp_path, monkeypatch):
    _fake_math_verify(tmp_path, monkeypatch, DIES)
    sols, gts, _ = _halves(300, 6)
    with WorkerPool(2, preload=()) as p:
        with pytest.raises(RewardError, match=r"(at least )?[4-6] of 6 rewards .*are failing, e.g. reward worker "
                                              r"pid \d+ exited with code 3"):
            get_reward_fn("math", pool=p).batch(sols, gts)
        assert p.stats["crashes"] >= 4


def test_one_crash_and_a_timeout_in_a_batch_score_as_wrong(tmp_path, monkeypatch):
    """Below the threshold, failures are wrong answers; a pathological answer's timeout never counts."""
    token = tmp_path / "crash-token"
    token.touch()
    # The first worker to import math_verify takes the token and dies; later ones get the real package.
    _fake_math_verify(tmp_path, monkeypatch, f"""
import importlib, os, sys
try:
    os.remove({str(token)!r})
except FileNotFoundError:
    sys.path[:] = [p for p in sys.path if p != {str(tmp_path)!r}]
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)
else:
    os._exit(3)
""")
    sols, gts, expected = _halves(400, 4)
    sols.append("\\boxed{10^{10^{11}}}")  # soft timeout: wrong, the worker survives
    gts.append("5")
    with WorkerPool(1).start() as p:  # one worker, one item at a time: the first item meets the crash
        scores = score_batch(sols, gts, pool=p, timeout=3.0)
        assert scores == [0.0] + expected[1:] + [0.0]
        assert p.stats["crashes"] == 1 and p.stats["soft_timeouts"] + p.stats["hard_timeouts"] == 1


def test_check_reward_fn_on_a_working_setup(tmp_path, monkeypatch):
    check_reward_fn("math")  # the trainer's call: real default pool, real math-verify
    assert len(get_default_pool().worker_pids()) == get_default_pool().size
    check_reward_fn("math_dapo")
    check_reward_fn("arithmetic")
    (tmp_path / "pre_rewards.py").write_text(
        "def ok(solution, ground_truth):\n    return float(solution == ground_truth)\n"
        "def text(solution, ground_truth):\n    return 'one'\n"
        "def boom(solution, ground_truth):\n    raise KeyError(ground_truth)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check_reward_fn("pre_rewards:ok")
    check_reward_fn("pre_rewards:ok", example=("a", "b"))
    with pytest.raises(RewardError, match="returned 'one'; a reward function must return a finite float"):
        check_reward_fn("pre_rewards:text")
    with pytest.raises(RewardError, match="raised in the reward worker: KeyError"):
        check_reward_fn("pre_rewards:boom")
    with pytest.raises(RewardError, match="unknown reward 'maths'"):
        check_reward_fn("maths")
    with pytest.raises(RewardError, match="cannot import module 'no_such_reward_module'"):
        check_reward_fn("no_such_reward_module:f")
