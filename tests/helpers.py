"""Helpers shared by test modules (tests/conftest.py sets markers and the schedule; fixtures live there too).

Real training jobs under torchrun (start_job / signal_job / wait), their outputs (rows, stored_tensors), the
tiny and paper-config runs they use (TINY_RUN, paper_run under CUDA emulation), and fake checkpoints for the
refusal tests that need no process group.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_a3po import checkpointing
from megatron_a3po import config as C
from megatron_a3po.job import resolve_job
from megatron_a3po.models import megatron_ckpt, tiny
from megatron_a3po.models.families import arch_from_hf_config

BASE = ["--tiny-model", "qwen2", "--micro-batch-size", "8"]  # the smallest valid model flags
REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TINY_RUN = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--entropy-coef", "0.01", "--rollout-batch-size", "8",
            "--ppo-mini-batch-size", "4", "--rollout-n", "4", "--micro-batch-size", "8", "--max-response-length", "6",
            "--eval-prompts", "8", "--eval-n", "2", "--eval-interval", "0"]


# The paper configs as tests run them: shrunk by one overlay, every GPU rule enforced by CUDA emulation; the
# reward hook scores the first character's parity, so a random model gets mixed rewards (non-zero gradients).
PAPER_FAMILIES = {"qwen3-8b-base_a3po.yaml": "qwen3", "qwen2.5-32b_a3po.yaml": "qwen2",
                  "qwen2.5-math-7b_a3po.yaml": "qwen2", "r1-distill-qwen-7b_a3po.yaml": "qwen2"}
EMULATED = {"A3PO_EMULATE_CUDA": "1", "A3PO_PROGRESS": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def paper_run(config: str) -> list[str]:
    """A paper config + the tiny overlay; its rollout TP capped at 2 (2 CPU ranks). Add --tiny-model FAMILY
    (PAPER_FAMILIES) for a fresh start."""
    import yaml

    rollout_tp = yaml.safe_load((REPO / "configs" / config).read_text())["rl"]["rollout_tensor_parallel_size"]
    return ["--config", str(REPO / "configs" / config), "--config", str(REPO / "configs/tests/tiny_paper.yaml"),
            "--reward", "layout_reward:first_char_parity", "--rollout-tensor-parallel-size", str(min(rollout_tp, 2))]


def start_job(args: list[str], log: Path, env: dict | None = None, base: list[str] = TINY_RUN) -> subprocess.Popen:
    """The training job under torchrun (which starts each rank in a session of its own: see signal_job)."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", **(env or {})}
    # --shutdown-timeout as a3po-train sets it: on SIGTERM torchrun waits this long for the ranks to finish their step
    # and checkpoint (its default, 30 s, SIGKILLs a rank whose step is slower, as a loaded 2-core machine can be).
    return subprocess.Popen([TORCHRUN, "--standalone", "--shutdown-timeout=300", "--nproc-per-node", "2", "-m",
                             "megatron_a3po.train", *base, *args],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def signal_job(proc: subprocess.Popen, sig: int) -> None:
    """Signal torchrun and every rank (torchrun's workers are not in its process group)."""
    import psutil

    processes = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_job(proc, signal.SIGKILL)
        pytest.fail(f"job timed out; log:\n{log.read_text()[-4000:]}")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def stored_tensors(ckpt: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(target))
    return torch.load(target, weights_only=False)


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def fake_training_checkpoint(path: Path, family: str = "qwen2", step: int = 2) -> Path:
    """A training checkpoint's metadata without tensors: enough for everything resolve_job checks."""
    path.mkdir(parents=True)
    hf_cfg = tiny.hf_config(family).to_dict()
    megatron_ckpt.CheckpointMeta(arch=arch_from_hf_config(hf_cfg), hf_config=hf_cfg, dtype="float32",
                                 padded_vocab_size=128, make_vocab_size_divisible_by=64).write(path)
    (path / "metadata.json").write_text("{}")
    (path / ".metadata").write_bytes(b"")
    cfg, _ = C.parse_args(["--tiny-model", family] + TINY_RUN[2:])
    (path / checkpointing.MARKER).write_text(json.dumps({
        "format": checkpointing.FORMAT, "version": 1, "step": step, "config": cfg.to_dict(),
        "layout": {"world_size": 2, "tp": 2, "pp": 1, "vpp": None, "cp": 1}}))
    return path


def validate(args: list[str]):
    cfg, _ = C.parse_args(TINY_RUN + args)
    cfg = resolve_job(cfg, 2).cfg
    return cfg


def assert_first_rl_step(step: dict) -> None:
    """A paper config's first RL step (tiny, emulated, packed) trained on a real policy gradient."""
    assert step["step"] == 1 and step["train/skipped_updates"] == 0
    assert math.isfinite(step["train/grad_norm"]) and step["train/grad_norm"] > 0
    assert step["pos/count"] > 0 and step["neg/count"] > 0  # mixed rewards: a real policy gradient
    assert step["mismatch/logp_abs_mean"] < 0.05  # vLLM (bf16) vs Megatron (bf16) after refit
    assert step["sync/host_syncs"] > 0  # counted under emulation (each one stalls a GPU stream)
    assert step["train/computed_tokens"] <= 1.1 * step["train/real_tokens"]  # packed (THD), SP-padded packs
    assert step["train/dp_imbalance"] == 1.0  # TP=2 on 2 ranks: DP=1
