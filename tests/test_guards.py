"""Run guards of the real job (torchrun, 2 ranks) with paper configs shrunk by configs/tests/tiny_paper.yaml
(bf16 + distributed optimizer + sequence parallel, TP=2, packed micro-batches) under CUDA emulation: NaN/Inf
updates are skipped (weights and Adam state bitwise unchanged) and stop the run after --max-consecutive-nan-steps
(R1-Distill-Qwen-7B's config; its first RL step is checked here too); SIGTERM (preemption) finishes the step,
checkpoints and exits 0, and the run resumes (Qwen2.5-32B's config)."""

from __future__ import annotations

import math
import signal
import time

import pytest
import torch

from megatron_a3po import checkpointing
from helpers import EMULATED, assert_first_rl_step, paper_run, rows, signal_job, start_job, stored_tensors, wait

PAPER = paper_run("qwen2.5-32b_a3po.yaml")


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path):
    out, save, log = tmp_path / "out", tmp_path / "ckpt", tmp_path / "nan.log"
    proc = start_job(["--tiny-model", "qwen2", "--train-steps", "6", "--output-dir", str(out), "--save", str(save),
                      "--save-interval", "1", "--max-consecutive-nan-steps", "2"], log,
                     env={**EMULATED, "A3PO_TEST_INJECT_NAN_STEP": "2,4,5"},
                     base=paper_run("r1-distill-qwen-7b_a3po.yaml"))
    code = wait(proc, log)
    text = log.read_text()
    assert code != 0 and "2 RL steps in a row had non-finite (NaN/Inf) loss or gradients" in text, text[-4000:]
    assert "Last good checkpoint:" in text and "step_000004" in text
    by_step = {r["step"]: r for r in rows(out) if "train/skipped_updates" in r}
    assert sorted(by_step) == [1, 2, 3, 4, 5]  # stopped after step 5, no final evaluation
    updates_per_step = 4 // 2  # rollout batch / PPO mini-batch (prompts)
    for step in (2, 4, 5):
        assert by_step[step]["train/skipped_updates"] == updates_per_step
        assert math.isnan(by_step[step]["train/grad_norm"])
    for step in (1, 3):
        assert by_step[step]["train/skipped_updates"] == 0 and math.isfinite(by_step[step]["train/grad_norm"])
    assert_first_rl_step(by_step[1])
    # Step 5 (the stopping step) wrote no checkpoint; the skipped step 4 left weights and Adam state untouched.
    assert (save / "latest").read_text().strip() == "step_000004"
    assert not (save / "step_000005").exists()
    at_3, at_4 = stored_tensors(save / "step_000003", tmp_path), stored_tensors(save / "step_000004", tmp_path)
    tensors = [k for k, v in at_4.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.isfinite(at_4[k]).all() and torch.equal(at_3[k], at_4[k]) for k in tensors)
    at_1, at_2 = stored_tensors(save / "step_000001", tmp_path), stored_tensors(save / "step_000002", tmp_path)
    assert all(torch.equal(at_1[k], at_2[k]) for k in tensors)  # the NaN step 2 changed nothing either
    assert any(not torch.equal(at_2[k], at_3[k]) for k in tensors)  # the good step 3 did train


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    out, save, log = tmp_path / "out", tmp_path / "ckpt", tmp_path / "term.log"
    # The in-process arithmetic reward: a module:function reward runs in worker processes, which the job's
    # SIGTERM reaches too (they do not survive a preemption signal yet).
    proc = start_job(["--tiny-model", "qwen2", "--train-steps", "200", "--output-dir", str(out),
                      "--save", str(save), "--reward", "arithmetic", "--entropy-coef", "0.01"], log, EMULATED, PAPER)
    deadline = time.monotonic() + 400
    while not ((out / "metrics.jsonl").exists() and any("train/lr" in r and r["step"] >= 1 for r in rows(out))):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no training step finished"
        time.sleep(0.2)
    signal_job(proc, signal.SIGTERM)  # like a cluster preemption: torchrun and every rank get it
    wait(proc, log, timeout=120)
    text = log.read_text()
    assert "SIGTERM: stopped after the current step; checkpoint:" in text, text[-4000:]
    # Every rank exited 0 (torchrun itself reports its own SIGTERM as a SignalException, not a failed child).
    assert "ChildFailedError" not in text and "exitcode  : " not in text
    last = max(r["step"] for r in rows(out) if "train/lr" in r)
    assert 1 <= last < 200
    assert (save / "latest").read_text().strip() == checkpointing.step_dir_name(last)
    assert checkpointing.read_train_state(save / checkpointing.step_dir_name(last))["step"] == last
    assert "validation accuracy" not in text  # stopped: no final evaluation
    # The preempted run resumes from its checkpoint for one more step.
    log = tmp_path / "resume.log"
    proc = start_job(["--load", str(save), "--train-steps", str(last + 1), "--output-dir", str(out),
                      "--save", str(save), "--reward", "arithmetic", "--entropy-coef", "0.01"], log, EMULATED, PAPER)
    assert wait(proc, log) == 0, log.read_text()[-4000:]
    assert f"at RL step {last + 1}" in log.read_text()
    assert max(r["step"] for r in rows(out) if "train/lr" in r) == last + 1
    assert (save / "latest").read_text().strip() == checkpointing.step_dir_name(last + 1)


if __name__ == "__main__":
    pytest.main([__file__])
