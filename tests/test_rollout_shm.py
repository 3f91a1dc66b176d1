"""vLLM's CPU all-reduce segments (rollout TP=2): two jobs at once, and a job after a SIGKILLed one.

Before rollout/cpu_shm.py every rollout-TP=2 engine on a host named its segments `/dev/shm/-tp:0-[0-1]-cpushm_*`:
the second engine failed at start with "create shm in SHMManager failed. errno: 17", and so did every engine after
a SIGKILLed job (its segments stayed). Real engines here, in real 2-rank jobs (megatron_a3po.spawn), on gloo.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from megatron_a3po.rollout import cpu_shm
from megatron_a3po.spawn import run_in_ranks

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def _engine_job(hf_dir: str, talk: str):
    """Start a rollout-TP=2 engine, generate, tell the test (pid, segment names) and wait until released."""
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.rollout.sampling import SamplingConfig

    import torch.distributed as dist

    engine = RolloutEngine(hf_dir, rollout_tp=2, max_model_len=64, seed=0)
    batch = engine.generate([[3, 10, 11], [3, 20]], SamplingConfig(n=2, max_new_tokens=4, seed=1), pad_id=0)
    held = [p.name for p in cpu_shm.segments(engine.shm_ident)]
    rank = dist.get_rank()
    Path(talk, f"rank{rank}").write_text(f"{os.getpid()}\n" + "\n".join(held))
    while not Path(talk, "release").exists():
        time.sleep(0.2)
    engine.close()
    return dict(ident=engine.shm_ident, held=held, rows=int(batch.tokens.shape[0]),
                left_after_close=[p.name for p in cpu_shm.segments(engine.shm_ident)])


def _start(hf_dir: str, talk: Path) -> dict:
    """The job in a thread: its ranks are processes; the result (or the error) lands in the returned dict."""
    talk.mkdir()
    box: dict = {}

    def body():
        try:
            box["result"] = run_in_ranks(_engine_job, 2, (hf_dir, str(talk)), timeout=300, env=VLLM_ENV)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            box["error"] = err

    box["thread"] = threading.Thread(target=body, daemon=True)
    box["thread"].start()
    return box


def _wait_ready(box: dict, talk: Path, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "error" in box:
            pytest.fail(f"engine job failed: {box['error']}")
        files = [talk / "rank0", talk / "rank1"]
        if all(f.exists() for f in files):
            time.sleep(0.2)  # the write is tiny; let it finish
            return [int(f.read_text().split()[0]) for f in files]
        time.sleep(0.5)
    pytest.fail("engine job did not start in time")


def _finish(box: dict, talk: Path) -> list[dict]:
    (talk / "release").touch()
    box["thread"].join(timeout=300)
    if "error" in box:
        pytest.fail(f"engine job failed: {box['error']}")
    return box["result"]


def test_two_jobs_at_once_then_one_after_a_sigkilled_job(tmp_path):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    hf_dir = str(write_tiny_hf_checkpoint(tmp_path / "m", "qwen2", seed=4))
    first = _start(hf_dir, tmp_path / "first")
    first_pids = _wait_ready(first, tmp_path / "first")
    first_segments = (tmp_path / "first/rank0").read_text().split()[1:]
    assert first_segments and all(n.startswith(f"a3po-{first_pids[0]}-") for n in first_segments), first_segments

    # A second job while the first holds its engine: before, errno 17 at engine start.
    second = _finish(_start(hf_dir, tmp_path / "second"), tmp_path / "second")
    assert [r["rows"] for r in second] == [4, 4]
    assert second[0]["ident"] == second[1]["ident"] != first_segments[0].split("-tp")[0]

    # SIGKILL the first job: its segments stay behind, and must neither block nor outlive the next job's start.
    for pid in first_pids:
        os.kill(pid, signal.SIGKILL)
    first["thread"].join(timeout=60)
    assert all((cpu_shm.SHM_ROOT / n).exists() for n in first_segments)
    third = _finish(_start(hf_dir, tmp_path / "third"), tmp_path / "third")
    assert [r["rows"] for r in third] == [4, 4]
    assert not any((cpu_shm.SHM_ROOT / n).exists() for n in first_segments)  # cleaned at the third's start
    for result in second + third:  # a closed engine leaves nothing behind
        assert result["held"] and result["left_after_close"] == [], result


def test_orphan_cleanup_spares_live_jobs_and_other_programs(tmp_path):
    dead = _dead_pid()
    live = os.getpid()
    names = [f"a3po-{dead}-0badc0de-tp:0-[0-1]-cpushm_0", f"a3po-{live}-12345678-tp:0-[0-1]-cpushm_0",
             "-tp:0-[0-1]-cpushm_0", "a3po-notapid-tp:0-cpushm_0", "other-program-segment"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert cpu_shm.remove_orphans(tmp_path) == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
