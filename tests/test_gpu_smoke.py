"""The GPU smoke scripts, run here without a GPU, and what they rely on.

- launch/gpu_train_smoke.py (the training-only part for a machine with torch + CUDA only) runs its whole job on CPU
  under CUDA emulation: bf16, distributed optimizer, packed local-spec THD, the NaN guard, a save and a bitwise resume,
  host syncs per step. On CPU it found that the local spec's fp32 norms break megatron-core's distributed optimizer
  under bf16 (its checkpoint paired model params with other params' main params; the save raised a size mismatch).
- launch/gpu_smoke.sh (inside the image) checks its flags with SMOKE_DRY_RUN=1.
- metrics.PhaseTimer measures each phase's peak device memory on CUDA (for the smokes' plan-vs-measured table).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from helpers import REPO


class Counter:
    """Stands in for CUDA's allocator counters (not present on CPU): peak since the last reset, set by hand."""

    def __init__(self):
        self.current = self.peak = 0
        self.resets = 0

    def use(self, nbytes: int) -> None:
        self.current = nbytes
        self.peak = max(self.peak, nbytes)

    def reset(self) -> None:
        self.resets += 1
        self.peak = self.current

    def read(self) -> tuple[int, int]:
        return self.peak, 2 * self.peak


def test_phase_timer_reports_each_phases_peak_memory_nested_phases_included():
    from megatron_a3po.metrics import PhaseTimer

    mem = Counter()
    timer = PhaseTimer(step=1, memory=mem)
    gib = 2**30
    with timer("rollout"):
        mem.use(5 * gib)
        with timer("reward"):  # nested: its own peak, and it counts for the enclosing phase too
            mem.use(7 * gib)
            mem.use(1 * gib)
        mem.use(2 * gib)
    with timer("train"):
        mem.use(3 * gib)
    with timer("train"):  # a phase entered twice keeps the larger peak
        mem.use(1 * gib)
    m = timer.as_metrics()
    assert m["memory/rollout_peak_gib"] == 7 and m["memory/reward_peak_gib"] == 7
    assert m["memory/train_peak_gib"] == 3 and m["memory/train_reserved_peak_gib"] == 6
    assert mem.resets == 4  # one per phase entered
    assert not any(k.startswith("memory/") for k in PhaseTimer(step=1).as_metrics())  # no CUDA here: nothing


def test_bf16_distributed_optimizer_pairs_every_param_with_its_own_main_param(monkeypatch):
    """megatron-core's DistributedOptimizer lists a group's fp32 params before its bf16 ones
    (_build_model_and_main_param_groups) while model_param_group_index_map keeps the grad buffer's order; its
    checkpoint (_get_main_param_and_optimizer_states) pairs by that map. Before LocalRMSNorm took params_dtype its
    fp32 weights shifted the map: qkv biases (512) got norms' main params (256) and the save raised."""
    from megatron_a3po import config as C
    from megatron_a3po import parallel
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models import families, tiny

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "0")):  # one rank: its store binds a port at once
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("A3PO_EMULATE_CUDA", raising=False)
    cfg, _ = C.parse_args(["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2",
                           "--tensor-model-parallel-size", "1", "--transformer-impl", "local", "--bf16",
                           "--use-distributed-optimizer", "--micro-batch-size", "8"])
    arch = families.arch_from_hf_config(tiny.hf_config("qwen2").to_dict())
    parallel.init_model_parallel(parallel.ParallelSizes(), seed=1)
    try:
        policy = PolicyModel(cfg, arch)
        (inner,) = policy.optimizer.chained_optimizers
        params = list(inner.model_param_group_index_map)
        assert len(params) == sum(1 for _ in policy.chunks[0].parameters()) == 30  # qkv biases and norms among them
        for param in params:  # at DP=1 each main param is the whole param in fp32
            main = inner._get_main_param_and_optimizer_states(param)["param"]
            assert main.shape == (param.numel(),) and torch.equal(main, param.detach().float().view(-1))
        assert {p.dtype for p in params} == {torch.bfloat16}  # as with Transformer Engine's layers
    finally:
        parallel.destroy()


def test_training_only_smoke_passes_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch/gpu_train_smoke.py"), "--out", str(tmp_path / "smoke")],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "A3PO_EMULATE_CUDA": "0"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = [line.split(None, 1) for line in out.splitlines() if line.startswith("  PASS") or line.startswith("  FAIL")]
    assert len(rows) == 9 and all(status == "PASS" for status, _ in rows), out
    assert "resume: B's steps 3-4 equal A's" in out and "bitwise" in out
    assert "NaN guard: step 1's update skipped, later ones not  [2.0, 0.0, 0.0, 0.0]" in out
    assert "CPU (A3PO_EMULATE_CUDA=1)" in out


def test_gpu_smoke_flags_pass_the_jobs_checks(tmp_path):
    proc = subprocess.run(["bash", "launch/gpu_smoke.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SMOKE_DRY_RUN": "1", "OUT": str(tmp_path / "smoke"),
                               "PY": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run A's flags accepted (GPUS=2)" in proc.stdout
    log = (tmp_path / "smoke" / "dry_run.log").read_text()
    assert "layout: world=2 TP=2 PP=1 CP=1 DP=1 rollout TP=2" in log
