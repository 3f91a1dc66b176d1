"""The real job (`torchrun -m megatron_a3po.train`) at three layouts from the same HF weights: TP=1 on 1 rank
and TP=2 with padded micro-batches, PP=2 with packed ones (--max-tokens-per-gpu), both on 2 ranks. Rollouts use
per-prompt seeds (independent of the rollout groups), so the first step sees the same batch everywhere, and its
loss, entropy and gradient norm must match TP=1. A reward hook that
scores the first character's parity gives a random model mixed rewards (non-zero advantages). (DAPO dynamic
sampling end to end runs in tests/test_launch_multinode.py, across two nodes.)"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
from helpers import REPO, TORCHRUN, rows, stored_tensors

RUN = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--reward", "layout_reward:first_char_parity",
       "--rollout-batch-size", "8", "--ppo-mini-batch-size", "4", "--rollout-n", "4", "--micro-batch-size", "8",
       "--max-response-length", "6", "--eval-prompts", "4", "--eval-n", "2", "--eval-interval", "0",
       "--train-steps", "2"]
LAYOUTS = {"tp1": (1, ["--tensor-model-parallel-size", "1"]),
           "tp2": (2, ["--tensor-model-parallel-size", "2"]),
           "pp2_packed": (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                              "--max-tokens-per-gpu", "48"])}


def run_job(nproc: int, args: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", "A3PO_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "megatron_a3po.train", *RUN, *args,
                           "--output-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return [r for r in rows(out) if "train/lr" in r]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("layouts") / "hf"
    write_tiny_hf_checkpoint(path, "qwen2", seed=0)
    return path


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("layout_runs")


def with_reference(hf_model) -> list[str]:
    """Every layout trains with a KL penalty to a reference policy loaded from the starting HF weights."""
    return ["--kl-coef", "0.05", "--kl-type", "low_var_kl", "--ref-load", str(hf_model)]


@pytest.fixture(scope="module")
def first_steps(hf_model, layout_runs):
    # The TP=2 run also checkpoints every step (distributed optimizer), for the cross-layout resume below.
    save = {"tp2": ["--use-distributed-optimizer", "--save", str(layout_runs / "tp2_ckpt"), "--save-interval", "1"]}
    return {name: run_job(nproc, ["--hf-path", str(hf_model), *with_reference(hf_model), *flags,
                                  *save.get(name, [])], layout_runs / name)
            for name, (nproc, flags) in LAYOUTS.items()}


@pytest.mark.parametrize("layout", ["tp2", "pp2_packed"])
def test_first_step_matches_tp1(first_steps, layout):
    ref, got = first_steps["tp1"], first_steps[layout]
    assert [r["step"] for r in got] == [1, 2]  # the run completed its steps
    first_ref, first = ref[0], got[0]
    # Same batch: identical rollouts and rewards (mixed, so the policy gradient is not zero).
    for key in ("reward/mean", "response/length_mean", "pos/count", "neg/count"):
        assert first[key] == first_ref[key], key
    assert first_ref["pos/count"] > 0 and first_ref["neg/count"] > 0
    # (pg_loss includes the KL penalty's term; loss/ref_kl itself is a mean of micro-batch means, split-dependent)
    for key in ("loss/pg_loss", "entropy", "train/grad_norm", "pos/clipfrac", "neg/clipfrac"):
        assert math.isclose(first[key], first_ref[key], rel_tol=1e-4, abs_tol=1e-6), \
            f"{key}: {layout} {first[key]} vs tp1 {first_ref[key]}"
    assert first_ref["train/grad_norm"] > 0 and first_ref["loss/pg_loss"] != 0
    # The reference (--ref-load: the starting weights) equals the policy before the first update, exactly; the
    # second mini-batch's policy has moved away from it, and by step 2 the old policy has too.
    assert first["ref/kl_k3"] == 0.0 and first["loss/ref_kl"] > 0 and got[1]["ref/kl_k3"] > 0
    if layout.endswith("packed"):  # 2 sequences of <= 21 tokens per pack of 48: little padding left
        assert first["train/computed_tokens"] <= 1.1 * first["train/real_tokens"]


def test_validation_metrics_come_from_the_eval_code(first_steps, layout_runs):
    """The trainer's validation (before training and after the last step) goes through evaluation.runner's
    evaluate_items, the code `a3po eval` uses: avg@k, unbiased pass@1..k, lengths, truncation."""
    val = [r for r in rows(layout_runs / "tp1") if "val/avg@k" in r]
    assert [r["step"] for r in val] == [0, 2]
    for r in val:
        assert r["val/k"] == 2 and {"val/pass@1", "val/pass@2", "val/length_mean", "val/truncated_fraction"} <= set(r)
        assert 0 <= r["val/avg@k"] <= r["val/pass@k"] == r["val/pass@2"] <= 1
        assert r["val/pass@1"] == pytest.approx(r["val/avg@k"])  # unbiased pass@1 is the mean accuracy
        assert 1 <= r["val/length_mean"] <= 6 and 0 <= r["val/truncated_fraction"] <= 1


def test_resume_at_another_layout_restores_the_optimizer(first_steps, hf_model, layout_runs, tmp_path):
    """TP=2 step-1 checkpoint -> PP=2 step 2, both with the distributed optimizer. With Adam's moments re-sharded,
    step 2's update matches the uninterrupted TP=2 run's; fresh moments move the weights by a different,
    lr-sized amount (measured: update 2e-4, restored gap 1e-7, fresh-optimizer gap 4e-4)."""
    ckpt = layout_runs / "tp2_ckpt"
    resumed = run_job(2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                          *with_reference(hf_model),
                          "--use-distributed-optimizer", "--load", str(ckpt / "step_000001"),
                          "--save", str(tmp_path / "ckpt")], tmp_path / "out")
    assert [r["step"] for r in resumed] == [2]
    ref_step2 = first_steps["tp2"][1]
    for key in ("reward/mean", "pos/count", "neg/count"):  # same data position, same rollouts
        assert resumed[0][key] == ref_step2[key], key
    before = stored_tensors(ckpt / "step_000001", tmp_path)
    after_ref = stored_tensors(ckpt / "step_000002", tmp_path)
    after = stored_tensors(tmp_path / "ckpt" / "step_000002", tmp_path)
    weights = [k for k, v in after_ref.items() if isinstance(v, torch.Tensor) and k.startswith("decoder.")
               and k in after and "_extra_state" not in k]
    assert weights and set(weights) <= set(after)
    update = max((after_ref[k] - before[k]).abs().max().item() for k in weights)
    gap = max((after[k] - after_ref[k]).abs().max().item() for k in weights)
    assert update > 1e-5 and gap < 0.01 * update, f"step-2 update {update:.3e}, gap to the TP=2 run {gap:.3e}"
