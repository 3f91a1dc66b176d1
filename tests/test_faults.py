"""Fault battery: bad inputs that used to pass validation, torn metrics lines, RNG states without pickle.
In-process (no process group); the counts are reported in the README's reliability section."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch

from megatron_a3po import checkpointing
from megatron_a3po import config as C
from megatron_a3po.errors import RunFilesError
from megatron_a3po.metrics import read_jsonl, trim_metrics
from megatron_a3po.job import resolve_job
from helpers import BASE

# Each of these passed validation before (most reached the trainer: nan learning rates train on nothing, a VPP
# stage of 0 layers died with ZeroDivisionError, 0 generation rounds generated forever).
BAD_INPUTS = [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--clip-grad", "nan"], "--clip-grad must be a finite number"),
    (["--rollout-temperature", "nan"], "--rollout-temperature must be a finite number"),
    (["--eval-temperature", "inf"], "--eval-temperature must be a finite number"),
    (["--eval-temperature", "-0.5"], "--eval-temperature must be in [0, inf)"),
    (["--clip-ratio-low", "-0.1"], "--clip-ratio-low must be in [0, 1)"),
    (["--clip-ratio-high", "-0.2"], "--clip-ratio-high must be in [0, inf)"),
    (["--dual-clip-c", "0.5"], "--dual-clip-c must be in (1, inf)"),
    (["--adam-beta1", "7"], "--adam-beta1 must be in [0, 1)"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be in [0, inf)"),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "1",
      "--num-layers-per-virtual-pipeline-stage", "0"], "--num-layers-per-virtual-pipeline-stage must be in [1, inf)"),
    (["--dynamic-sampling", "--max-num-gen-batches", "0"], "--max-num-gen-batches must be >= 1"),
    (["--sequence-parallel", "2"], "unrecognized arguments: 2"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--a3po-rho-pos", "inf"], "--a3po-rho-pos must be a finite number"),
    (["--rollout-top-k", "0"], "--rollout-top-k must be -1 (off) or >= 1"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be in [1, inf)"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_the_flag_named(flags, message, capsys):
    with pytest.raises((C.ConfigError, SystemExit)) as err:
        cfg, _ = C.parse_args(BASE + flags)
        cfg = resolve_job(cfg, 2).cfg
    text = str(err.value) if err.type is C.ConfigError else capsys.readouterr().err
    assert message in text


@pytest.mark.parametrize("value", [2, 0.5, "maybe", [True]])
def test_booleans_are_strict_in_yaml(value, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"rl:\n  dynamic_sampling: {value}\n")
    with pytest.raises(C.ConfigError, match="rl.dynamic_sampling .*is not a valid bool"):
        C.from_dict(C.load_yaml(path), source=str(path))
    for text, expected in (("true", True), ("off", False), ("1", True), ("0", False)):
        path.write_text(f"rl:\n  dynamic_sampling: {text}\n")
        assert C.from_dict(C.load_yaml(path)).rl.dynamic_sampling is expected


def test_torn_last_metrics_line_is_dropped_on_resume_and_in_plot(tmp_path, capsys):
    """A kill mid-write leaves half a JSON line; resume (trim_metrics) and `a3po plot` used to die on it with
    JSONDecodeError."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n{"step": 3, "rew')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert "dropped a torn last line" in capsys.readouterr().err
    trim_metrics(tmp_path, step=2)
    assert path.read_text() == '{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n'
    from megatron_a3po.cli import a3po

    path.write_text(path.read_text() + '{"step": 3, "rew')
    assert a3po(["plot", str(tmp_path)]) == 0
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage in the middle is not a torn write: refused
    with pytest.raises(RunFilesError, match=r"metrics.jsonl:2: not a JSON line"):
        read_jsonl(path)
    capsys.readouterr()
    assert a3po(["plot", str(tmp_path)]) == 2  # one line naming the file and line, no traceback
    err = capsys.readouterr().err
    assert "metrics.jsonl:2: not a JSON line" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_rng_states_round_trip_without_pickle():
    """Rank RNG states are tensors and numbers: torch.load(weights_only=True) reads them (it refuses pickled
    objects, which a checkpoint from an untrusted source could use to run code)."""
    from megatron.core import tensor_parallel

    from megatron_a3po import platform

    platform.enable_cpu_compat()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if "test-rng" not in tracker.get_states():
        tracker.add("test-rng", 5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3), random.gauss(0, 1), np.random.normal()

    def draw():
        with tracker.fork("test-rng"):
            forked = torch.rand(1).item()
        return random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal(), torch.rand(1).item(), forked

    buffer = io.BytesIO()
    torch.save({"rng": checkpointing.rng_state()}, buffer)
    first = draw()
    buffer.seek(0)
    checkpointing.set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert draw() == first
    planted = io.BytesIO()
    torch.save({"rng": _RunsCode()}, planted)  # what a doctored checkpoint could hold
    planted.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(planted, weights_only=True)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would run while loading",))


# ---- the checkpoint commit protocol under SIGKILL (plain files: each child process starts in ~0.2 s) -------

SAVER = r"""
import sys
from pathlib import Path
from megatron_a3po import checkpoint_files as files

save_dir, first, last, version = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for step in range(first, last + 1):
    final = save_dir / files.step_dir_name(step)
    tmp = save_dir / (files.TMP_PREFIX + final.name)
    files.clean_stale(save_dir)
    tmp.mkdir(parents=True)
    (tmp / "rank_state").mkdir()
    for i in range(4):  # what the ranks would write, deterministic per (step, version)
        (tmp / ("rank_state" if i % 2 else ".") / f"part_{i}.bin").write_bytes(f"{step}:{version}:{i};".encode() * 20000)
    files.commit(tmp, final, {"step": step, "version": version})
    files.retain(save_dir, keep_last=2, keep_interval=0)
"""


def _save(save_dir, first, last, version="a", kill_at=None, background=False):
    import os
    import subprocess
    import sys

    env = {**os.environ, **({"A3PO_TEST_KILL_AT": kill_at} if kill_at else {})}
    args = [sys.executable, "-c", SAVER, str(save_dir), str(first), str(last), version]
    if background:
        return subprocess.Popen(args, env=env)
    return subprocess.run(args, env=env).returncode


def _assert_resumable_is_whole(save_dir):
    """find_resumable returns a checkpoint whose every file holds exactly what its step and version wrote."""
    from megatron_a3po import checkpoint_files as files

    found, _ = files.find_resumable(save_dir)
    if found is None:
        return None
    state = __import__("json").loads((found / files.MARKER).read_text())
    assert files.problems(found) == []
    for i in range(4):
        data = (found / ("rank_state" if i % 2 else ".") / f"part_{i}.bin").read_bytes()
        assert data == f"{state['step']}:{state['version']}:{i};".encode() * 20000, (found, i)
    return state["step"], state["version"]


@pytest.mark.parametrize("point", ["before_marker", "after_marker", "after_aside", "after_rename", "after_latest"])
def test_sigkill_at_each_point_of_a_save_loses_nothing(point, tmp_path):
    """Step 2 is saved again (as after a resume) and killed at `point`: the old step 2 or the new one resumes,
    whole, never a mix or a partial directory; the next save cleans up and commits."""
    save_dir = tmp_path / "ckpt"
    assert _save(save_dir, 1, 2, "a") == 0
    assert _save(save_dir, 2, 2, "b", kill_at=point) == -9
    resumable = _assert_resumable_is_whole(save_dir)
    assert resumable in {(2, "a"), (2, "b")}, resumable
    assert _save(save_dir, 3, 3, "c") == 0
    assert _assert_resumable_is_whole(save_dir) == (3, "c")
    leftovers = [p.name for p in save_dir.iterdir() if p.name.startswith((".tmp_", ".old_"))]
    assert leftovers == [], leftovers


KILL_DELAYS = [0.2 + 0.04 * k + 0.011 * (k * k % 7) for k in range(10)]  # 10 points (start-up takes ~0.15 s)


@pytest.mark.parametrize("delay", KILL_DELAYS, ids=[f"{d:.3f}s" for d in KILL_DELAYS])
def test_sigkill_at_random_moments_of_repeated_saves(delay, tmp_path):
    """A process saving steps 1..40 (retention keeping 2) is SIGKILLed after `delay` seconds: the newest
    complete checkpoint is whole, no older than the last one `latest` named, and saving resumes cleanly."""
    import signal
    import time

    save_dir = tmp_path / "ckpt"
    proc = _save(save_dir, 1, 40, "a", background=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = save_dir / "latest"
    named = int(latest.read_text().strip()[5:]) if latest.is_file() else 0
    resumable = _assert_resumable_is_whole(save_dir)
    assert resumable is None and named == 0 or resumable[0] >= named
    next_step = (resumable[0] if resumable else 0) + 1
    assert _save(save_dir, next_step, next_step, "z") == 0
    assert _assert_resumable_is_whole(save_dir) == (next_step, "z")


# ---- a full disk: every rank refuses together, nothing is written --------------------------------------------


def _save_with_rank1_disk_full(save_dir: str):
    import os

    import torch
    import torch.distributed as dist

    from megatron_a3po import checkpointing
    from megatron_a3po.config import Config

    os.environ["A3PO_TEST_FREE_BYTES"] = "0" if dist.get_rank() == 1 else str(2**50)

    class Policy:
        chunks = [torch.nn.Linear(64, 64)]

    cfg = Config()
    cfg.training.save = save_dir
    try:
        checkpointing.Checkpointer(cfg, Policy(), sampler=None, hf_config={}, tokenizer_dir=save_dir).save(1)
        return "saved"
    except checkpointing.CheckpointError as err:
        return str(err)


def test_full_disk_fails_every_rank_together_before_writing(tmp_path):
    """Rank 1's filesystem is full: both ranks raise the same error at once (before, rank 1 died mid-save while
    rank 0 waited in a barrier for 30 minutes), and nothing was written."""
    from megatron_a3po.spawn import run_in_ranks

    save_dir = tmp_path / "ckpt"
    messages = run_in_ranks(_save_with_rank1_disk_full, 2, (str(save_dir),), timeout=120)
    assert messages[0] == messages[1] and "0.00 GiB free for rank 1" in messages[0]
    assert "--keep-last-checkpoints" in messages[0] and not save_dir.exists()


# ---- two runs, one directory --------------------------------------------------------------------------------


def test_a_second_run_into_the_same_directories_is_refused(tmp_path):
    import subprocess
    import sys

    from megatron_a3po import checkpoint_files as files
    from megatron_a3po import run_dir

    cfg, _ = C.parse_args([*BASE, "--save", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out")])
    first = run_dir.RunLock([tmp_path / "out", tmp_path / "ckpt"])
    assert first.acquire() == []
    second = run_dir.RunLock([tmp_path / "out", tmp_path / "ckpt"])
    (problem,) = second.acquire()
    assert "is in use by another run (pid" in problem and "give this run its own --save / --output-dir" in problem
    first.release()
    assert second.acquire() == []  # released: free again
    second.release()
    # a lock whose process is gone (SIGKILLed run, same host) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / run_dir.LOCK).write_text(
        '{"pid": %d, "host": "%s", "started": "x"}' % (int(dead.stdout), __import__("socket").gethostname()))
    third = run_dir.RunLock([tmp_path / "out"])
    assert third.acquire() == []
    third.release()
    # a fresh run refuses directories holding another run's checkpoints or metrics; a resumed one continues
    (tmp_path / "ckpt" / files.step_dir_name(4)).mkdir(parents=True)
    (tmp_path / "ckpt" / files.step_dir_name(4) / files.MARKER).write_text("{}")
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    problems = run_dir.foreign_files(cfg, resuming=False)
    assert "holds checkpoints of another run (step_000004): resume that run with --load" in problems[0]
    assert "holds another run's metrics.jsonl" in problems[1]
    assert run_dir.foreign_files(cfg, resuming=True) == []


def test_resuming_under_another_algorithm_is_refused(tmp_path):
    """A DAPO baseline resumed from an A3PO run's checkpoint used to continue with a warning."""
    from helpers import fake_training_checkpoint, validate

    fake_training_checkpoint(tmp_path / "save" / "step_000002")
    with pytest.raises(checkpointing.CheckpointError, match=r"another algorithm or model setup \(rl.algorithm: checkpoint 'a3po', "
                                            r"now 'dapo'\).*--allow-config-change"):
        validate(["--load", str(tmp_path / "save"), "--train-steps", "4", "--algorithm", "dapo"])
    validate(["--load", str(tmp_path / "save"), "--train-steps", "4", "--algorithm", "dapo", "--allow-config-change"])


def test_baseline_overlays_get_their_own_directories():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    paper = ["--config", str(repo / "configs/qwen3-8b-base_a3po.yaml")]
    a3po, _ = C.parse_args(paper)
    dapo, _ = C.parse_args([*paper, "--config", str(repo / "configs/baselines/dapo.yaml")])
    assert a3po.training.save == "/ckpt/runs/qwen3-8b-base_a3po" and dapo.training.save == "/ckpt/runs/qwen3-8b-base_dapo"
    assert (a3po.rl.output_dir, dapo.rl.output_dir) == ("runs/qwen3-8b-base_a3po", "runs/qwen3-8b-base_dapo")
    assert (a3po.rl.wandb_run_name, dapo.rl.wandb_run_name) == ("qwen3-8b-base_a3po", "qwen3-8b-base_dapo")


def test_retention_keeps_the_newest_every_interval_and_latest(tmp_path):
    """--keep-last-checkpoints 2 --keep-checkpoint-interval 4 over steps 1..9: 8, 9 (newest), 4, 8 (interval);
    removal deletes the marker first, so a removal killed halfway never leaves a dir that passes for complete."""
    from megatron_a3po import checkpoint_files as files

    save_dir = tmp_path / "ckpt"
    assert _save(save_dir, 1, 9, "a") == 0  # the saver keeps 2, no interval: 8 and 9 remain
    assert sorted(files.committed_steps(save_dir)) == [8, 9]
    for step in range(1, 8):
        (save_dir / files.step_dir_name(step)).mkdir()
        (save_dir / files.step_dir_name(step) / files.MARKER).write_text("{}")
    removed = files.retain(save_dir, keep_last=2, keep_interval=4)
    assert sorted(files.committed_steps(save_dir)) == [4, 8, 9] and len(removed) == 6
    assert files.retain(save_dir, keep_last=0, keep_interval=0) == []  # 0: keep everything
    half_removed = save_dir / files.step_dir_name(4)
    (half_removed / files.MARKER).unlink()  # what remove() does first
    assert files.find_resumable(save_dir)[0].name == "step_000009" and files.problems(half_removed)
