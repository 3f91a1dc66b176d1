"""Training checkpoints: exact resume after a hard kill, and the refusals of bad --load directories.

The end-to-end test runs the real job (`torchrun -m megatron_a3po.train`, 2 ranks) three times with the
Qwen3-8B paper config shrunk by configs/tests/tiny_paper.yaml (bf16, distributed optimizer, sequence parallel,
TP=2, full recompute, rollout TP=2) under CUDA emulation: 3 uninterrupted steps; 3 steps SIGKILLed once the
step-2 checkpoint exists; a resume of the killed run with `--load SAVE_DIR` (follows `latest`). Step 3 of the
resumed run must reproduce the uninterrupted run bitwise (metrics, weights and Adam state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import (EMULATED, REPO, fake_training_checkpoint, paper_run, rows, same, signal_job, start_job,
                     stored_tensors, validate, wait)
from megatron_a3po import checkpoint_files, checkpointing
from megatron_a3po import config as C
from megatron_a3po.models import megatron_ckpt


def test_exact_resume_after_sigkill(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # Also: vLLM's log-probs as pi_old (no old-log-prob pass) and DAPO's overlong penalty on the last token.
    base = [*paper_run("qwen3-8b-base_a3po.yaml"), "--use-rollout-logprobs", "--overlong-buffer-len", "1",
            "--overlong-penalty-factor", "0.5"]
    log = tmp_path / "ref.log"
    proc = start_job(["--tiny-model", "qwen3", "--train-steps", "2", "--output-dir", str(ref / "out"),
                      "--save", str(ref / "ckpt"), "--save-interval", "1"], log, EMULATED, base)
    assert wait(proc, log) == 0, log.read_text()[-4000:]

    # Same job, killed inside its first save: rank 0 SIGKILLs itself right after renaming step_000001 into place,
    # before `latest` exists (A3PO_TEST_KILL_AT, checkpoint_files.kill_point); then every process is killed.
    log = tmp_path / "killed.log"
    proc = start_job(["--tiny-model", "qwen3", "--train-steps", "2", "--output-dir", str(killed / "out"),
                      "--save", str(killed / "ckpt"), "--save-interval", "1"], log,
                     {**EMULATED, "A3PO_TEST_KILL_AT": "after_rename"}, base)
    deadline = time.monotonic() + 400
    while not (killed / "ckpt" / "step_000001").exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    time.sleep(1)
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the ranks, reparented, are gone too (nothing may write step 2 files now)
    assert not (killed / "ckpt" / "latest").exists() and not (killed / "ckpt" / "step_000002").exists()
    assert checkpoint_files.problems(killed / "ckpt" / "step_000001") == []  # complete: its manifest holds

    # Resume from the --save directory: no `latest`, so the newest complete checkpoint (a warning says so); the
    # model comes from the checkpoint alone.
    log = tmp_path / "resume.log"
    proc = start_job(["--load", str(killed / "ckpt"), "--train-steps", "2", "--output-dir", str(killed / "out"),
                      "--save", str(killed / "ckpt"), "--save-interval", "1"], log, EMULATED, base)
    assert wait(proc, log) == 0, log.read_text()[-4000:]
    assert "resuming from" in log.read_text() and "at RL step 2" in log.read_text()
    assert "has no `latest` file" in log.read_text()
    assert "took over a stale lock" in log.read_text()  # the killed job's lock: its pid is gone

    expected, resumed = rows(ref / "out"), rows(killed / "out")
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]  # rows after step 1 trimmed, not doubled
    for want, got in zip(expected, resumed):
        keys = {k for k in want if not k.startswith(("time/", "sync/"))}
        assert keys == {k for k in got if not k.startswith(("time/", "sync/"))}
        diffs = {k: (want[k], got[k]) for k in keys if not same(want[k], got[k])}
        assert not diffs, f"step {want['step']}: {diffs}"
    for r in (r for r in expected if "train/lr" in r):
        # --use-rollout-logprobs: the old-log-prob pass is skipped (0 s); no old entropy, nothing to compare
        assert r["time/old_logprobs"] == 0 and "entropy" not in r and "mismatch/kl_k3" not in r
        assert r["train/grad_norm"] > 0 and r["train/skipped_updates"] == 0
        # every response at the cap (6 tokens; all truncated ones are) loses 0.5, none other
        assert -0.5 <= r["reward/overlong_penalty"] <= -0.5 * r["response/truncated_fraction"] < 0

    final_ref = stored_tensors(ref / "ckpt" / "step_000002", tmp_path)
    final_resumed = stored_tensors(killed / "ckpt" / "step_000002", tmp_path)
    at_step_1 = stored_tensors(ref / "ckpt" / "step_000001", tmp_path)
    assert final_ref.keys() == final_resumed.keys()
    for key, value in final_ref.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_resumed[key]), key
    assert any(isinstance(v, torch.Tensor) and not torch.equal(v, at_step_1[key]) for key, v in final_ref.items()), \
        "training did not change the weights: the comparison would prove nothing"
    # Optimizer state (Adam moments) equal too.
    opt_ref = stored_tensors(ref / "ckpt" / "step_000002" / "optimizer", tmp_path)
    opt_resumed = stored_tensors(killed / "ckpt" / "step_000002" / "optimizer", tmp_path)
    assert opt_ref.keys() == opt_resumed.keys() and len(opt_ref) > 0
    # ... written in the canonical per-parameter format that re-shards to any TP/PP/DP (optimizer_state.py)
    from megatron.core.dist_checkpointing import load_common_state_dict

    common = load_common_state_dict(ref / "ckpt" / "step_000002" / "optimizer")
    assert common["param_state_sharding_type"] == "fully_reshardable", common.keys()
    for key, value in opt_ref.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, opt_resumed[key]), key
    # The checkpoint is also a converted checkpoint (weights only, any TP/PP).
    meta = megatron_ckpt.read_meta(ref / "ckpt" / "step_000002")
    assert meta.saved_tensor_parallel_size == 2 and meta.arch.family == "qwen3" and meta.dtype == "bfloat16"
    # ... which loads at another TP: export the TP=2 training checkpoint at TP=1, weights identical.
    from safetensors.torch import load_file

    proc = subprocess.run([sys.executable, "-m", "checkpoints_tools.convert", "megatron-to-hf", "--megatron-path",
                           str(ref / "ckpt" / "step_000002"), "--output", str(tmp_path / "hf"),
                           "--tensor-model-parallel-size", "1", "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **EMULATED})
    assert proc.returncode == 0, proc.stderr[-4000:]
    embed = load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(embed, final_ref["embedding.word_embeddings.weight"][:embed.shape[0]])
    state = checkpointing.read_train_state(ref / "ckpt" / "step_000002")
    assert state["step"] == 2 and state["layout"]["tp"] == 2 and state["sampler"]["index"] > 0
    resolved = json.loads((ref / "ckpt" / "step_000002" / "config.json").read_text())
    assert resolved["rl"]["train_steps"] == 2
    # The paper's flags survived the shrinking overlay.
    assert resolved["model"]["bf16"] and resolved["training"]["use_distributed_optimizer"]
    assert resolved["parallel"]["sequence_parallel"] and resolved["model"]["recompute_granularity"] == "full"
    assert not list((ref / "ckpt").glob(".tmp_*"))


# ---- refusals (no process group) --------------------------------------------------------------------------


def test_load_dir_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpointing.CheckpointError, match="neither a training checkpoint .* nor a converted checkpoint"):
        validate(["--load", str(tmp_path / "empty")])
    (tmp_path / "save" / ".tmp_step_000002").mkdir(parents=True)
    with pytest.raises(checkpointing.CheckpointError, match=r"only holds interrupted saves \['.tmp_step_000002'\]"):
        validate(["--load", str(tmp_path / "save")])
    (tmp_path / "save" / "latest").write_text("step_000009\n")
    with pytest.raises(checkpointing.CheckpointError, match="names 'step_000009', which is not a complete training checkpoint"):
        validate(["--load", str(tmp_path / "save")])


def test_load_follows_latest_and_checks_the_model(tmp_path, capsys):
    fake_training_checkpoint(tmp_path / "save" / "step_000002")
    (tmp_path / "save" / "latest").write_text("step_000002\n")
    cfg = validate(["--load", str(tmp_path / "save"), "--train-steps", "4"])
    assert cfg.training.load == str(tmp_path / "save" / "step_000002")
    validate(["--load", str(tmp_path / "save"), "--train-steps", "4", "--tiny-model", "qwen2"])  # same model: fine
    with pytest.raises(checkpointing.CheckpointError, match="holds a different model: family: .*Drop --tiny-model"):
        validate(["--load", str(tmp_path / "save"), "--train-steps", "4", "--tiny-model", "llama"])
    with pytest.raises(checkpointing.CheckpointError, match="already reaches --train-steps 2; raise --train-steps"):
        validate(["--load", str(tmp_path / "save"), "--train-steps", "2"])
    capsys.readouterr()
    validate(["--load", str(tmp_path / "save"), "--train-steps", "4", "--seed", "7"])
    assert "training.seed: checkpoint 1234, now 7" in capsys.readouterr().err
    (tmp_path / "save" / "step_000002" / checkpointing.MARKER).write_text('{"format": "other"}')
    with pytest.raises(checkpointing.CheckpointError, match="not a training checkpoint"):
        validate(["--load", str(tmp_path / "save" / "step_000002"), "--train-steps", "4"])
