"""The four paper configs as users run them, shrunk to CPU size by one overlay (configs/tests/tiny_paper.yaml),
under CUDA emulation (the GPU's device and NCCL rules enforced on CPU).

- Every config keeps its flags through the overlay (checked on the resolved config, no process group).
- Qwen2.5-Math-7B runs its first RL step here (2 ranks); R1-Distill-Qwen-7B its first steps in the NaN-guard
  run and Qwen2.5-32B SIGTERM + resume (test_guards.py); Qwen3-8B 2 steps + SIGKILL + resume
  (test_checkpoint_resume.py).
- SFT (the warm start) with the paper's flags: bf16, distributed optimizer, sequence parallel, full recompute,
  TP=2, then the streaming HF export it ends with.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from megatron_a3po import config as C
from megatron_a3po.job import resolve_job
from helpers import EMULATED, PAPER_FAMILIES, REPO, TORCHRUN, assert_first_rl_step, paper_run, rows

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA emulation is for machines without CUDA")


def _torchrun(module: str, args: list[str], log: Path) -> int:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", **EMULATED}
    with log.open("w") as out:
        return subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", module, *args], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode


@pytest.mark.parametrize("config", sorted(PAPER_FAMILIES))
def test_overlay_shrinks_sizes_and_keeps_the_flags(config):
    cfg, _ = C.parse_args([*paper_run(config), "--tiny-model", PAPER_FAMILIES[config]])
    cfg = resolve_job(cfg, 2).cfg
    paper = yaml.safe_load((REPO / "configs" / config).read_text())
    assert cfg.model.bf16 and cfg.training.use_distributed_optimizer and cfg.parallel.sequence_parallel
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.model.recompute_granularity == "full"
    assert cfg.training.clip_grad == paper["training"]["clip_grad"] == 1.0
    assert cfg.training.micro_batch_size == paper["training"]["micro_batch_size"]
    assert paper["training"]["max_tokens_per_gpu"] and cfg.training.max_tokens_per_gpu == 32  # packed, shrunk
    assert (cfg.rl.clip_ratio_low, cfg.rl.clip_ratio_high) == (0.2, 0.28)
    assert cfg.rl.loss_agg_mode == "token-mean" and cfg.rl.algorithm == "a3po"
    assert cfg.rl.rollout_tensor_parallel_size == min(paper["rl"]["rollout_tensor_parallel_size"], 2)
    for key in ("a3po_ratio", "a3po_rho_pos", "a3po_alpha_pos", "a3po_rho_neg", "a3po_alpha_neg"):
        assert getattr(cfg.rl, key) == paper["rl"][key], key
    assert cfg.model.hf_path is None and cfg.rl.max_response_length <= 8  # only sizes and data changed


def test_first_rl_step_under_emulation(tmp_path):
    """Qwen2.5-Math-7B's config; the other three configs' first steps run in the jobs of test_guards.py (NaN
    guard: R1-Distill-Qwen-7B; SIGTERM: Qwen2.5-32B) and test_checkpoint_resume.py (Qwen3-8B): one job each."""
    config = "qwen2.5-math-7b_a3po.yaml"
    out = tmp_path / "out"
    rc = _torchrun("megatron_a3po.train", [*paper_run(config), "--tiny-model", PAPER_FAMILIES[config],
                                           "--output-dir", str(out), "--save", str(tmp_path / "ckpt")],
                   tmp_path / "job.log")
    assert rc == 0, (tmp_path / "job.log").read_text()[-5000:]
    (step,) = [r for r in rows(out) if "train/lr" in r]
    assert_first_rl_step(step)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000001"


def test_sft_with_the_paper_flags_under_emulation(tmp_path):
    from safetensors.torch import load_file

    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    base = write_tiny_hf_checkpoint(tmp_path / "base", "qwen2", seed=0)
    rc = _torchrun("megatron_a3po.sft", ["--hf-path", str(base), "--sft-output", str(tmp_path / "sft"),
                                         "--sft-steps", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--bf16", "--use-distributed-optimizer", "--recompute-granularity", "full",
                                         "--clip-grad", "1.0", "--make-vocab-size-divisible-by", "64",
                                         "--global-batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-3",
                                         "--train-iters", "2"], tmp_path / "sft.log")
    assert rc == 0, (tmp_path / "sft.log").read_text()[-5000:]
    trained, start = load_file(tmp_path / "sft" / "model.safetensors"), load_file(Path(base) / "model.safetensors")
    assert trained.keys() == start.keys()
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in trained.values())
    assert any(not torch.equal(trained[k].float(), start[k].to(torch.bfloat16).float()) for k in trained)
