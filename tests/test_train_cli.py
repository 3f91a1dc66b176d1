"""The main job's entry point: flag validation before any process group, --dry-run, every config file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_a3po import config as C
from megatron_a3po.models.known_archs import PAPER_MODELS
from megatron_a3po.job import resolve_job
from megatron_a3po.rl_config import resolve_algorithm
from helpers import BASE, REPO


INVALID_RL = [
    (["--algorithm", "ppo_plus"], 2, "--algorithm 'ppo_plus' is unknown"),
    (["--rollout-batch-size", "10", "--ppo-mini-batch-size", "4"], 2, "--rollout-batch-size 10 must be a multiple"),
    (["--ppo-mini-batch-size", "1", "--rollout-n", "4", "--rollout-batch-size", "4"], 1,
     "4 sequences must split into --micro-batch-size 8"),
    (["--rollout-tensor-parallel-size", "3"], 2, "--rollout-tensor-parallel-size 3 must divide the world size 2"),
    (["--rollout-temperature", "0"], 1, "--rollout-temperature must be > 0"),
    (["--a3po-ratio", "0"], 1, "--a3po-ratio must be in (0, 1]"),
    (["--a3po-metric", "logit"], 1, "--a3po-metric must be prob or entropy"),
    (["--loss-agg-mode", "sum"], 1, "--loss-agg-mode 'sum' is unknown"),
    (["--ppo-epochs", "0"], 1, "--ppo-epochs must be >= 1"),
    (["--max-response-length", "0"], 1, "--max-response-length must be >= 1"),
    (["--eval-n", "0"], 1, "--eval-prompts and --eval-n >= 1"),
    (["--rollout-top-p", "1.5"], 1, "--rollout-top-p and --eval-top-p must be in (0, 1]"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2, "not divisible by"),
    (["--fp8-format", "hybrid", "--bf16"], 1, "--fp8-format needs Transformer Engine"),
    (["--dynamic-sampling", "--max-num-gen-batches", "-1"], 1, "--max-num-gen-batches must be >= 1"),
    (["--dynamic-sampling", "--max-num-gen-batches", "0"], 1, "--max-num-gen-batches must be >= 1"),
]


@pytest.mark.parametrize("flags,world,message", INVALID_RL, ids=[" ".join(f) for f, _, _ in INVALID_RL])
def test_invalid_rl_flags_are_refused(flags, world, message):
    cfg, _ = C.parse_args(BASE + flags)
    with pytest.raises(C.ConfigError) as err:
        cfg = resolve_job(cfg, world).cfg
    assert message in str(err.value)


def test_missing_model_and_missing_checkpoint():
    cfg, _ = C.parse_args(["--micro-batch-size", "8"])
    with pytest.raises(C.ConfigError, match="give a model"):
        cfg = resolve_job(cfg, 1).cfg
    cfg, _ = C.parse_args(["--load", "/nonexistent/ckpt"])
    with pytest.raises((C.ConfigError, ValueError, FileNotFoundError), match="/nonexistent/ckpt"):
        cfg = resolve_job(cfg, 1).cfg


def test_rl_derives_megatron_batch_and_iters():
    cfg, _ = C.parse_args(BASE + ["--rollout-batch-size", "32", "--ppo-mini-batch-size", "16", "--rollout-n", "8",
                                  "--train-steps", "5", "--ppo-epochs", "2"])
    cfg = resolve_job(cfg, 2).cfg
    assert cfg.training.global_batch_size == 16 * 8
    assert cfg.training.train_iters == 5 * 2 * 2


PAPER_CONFIGS = sorted(REPO.glob("configs/*_a3po.yaml"))
BASELINES = sorted(REPO.glob("configs/baselines/*.yaml"))


def _paper_overrides(path, tmp_path):
    """Point a paper config at a local config.json with the real architecture and at a local dataset file."""
    import json

    cfg, _ = C.parse_args(["--config", str(path)])
    model = Path(cfg.model.hf_path).name
    hf_dir = tmp_path / model
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(PAPER_MODELS[model]))
    data = tmp_path / "prompts.jsonl"
    data.write_text("")
    return ["--hf-path", str(hf_dir), "--dataset", str(data), "--eval-dataset", str(data)]


def test_tiny_cpu_config_validates():
    cfg, _ = C.parse_args(["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2"])
    cfg = resolve_job(cfg, 2).cfg


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("baseline", [None] + BASELINES, ids=lambda p: p.stem if p else "a3po")
def test_paper_setups_validate_for_16_gpus(path, baseline, tmp_path):
    """Each paper setup (and each baseline overlay on it) is a valid 2 x 8 GPU job: TP divides heads and query
    groups, batch sizes divide, the 512 x 8 / 32-prompt mini-batch regime holds."""
    overlay = ["--config", str(baseline)] if baseline else []
    cfg, _ = C.parse_args(["--config", str(path), *overlay, *_paper_overrides(path, tmp_path)])
    if cfg.model.fp8_format is None:
        cfg = resolve_job(cfg, 16).cfg
    expected = baseline.stem if baseline else "a3po"
    assert cfg.rl.algorithm == expected
    assert (cfg.rl.rollout_batch_size, cfg.rl.rollout_n, cfg.rl.ppo_mini_batch_size) == (512, 8, 32)
    assert cfg.training.lr == 1e-6 and cfg.rl.train_steps == 300
    assert cfg.training.global_batch_size == 32 * 8 and cfg.training.train_iters == 300 * 16
    if baseline is None:
        algorithm = resolve_algorithm(cfg.rl)
        assert (algorithm.shaper.name, algorithm.loss.name, algorithm.aggregation) == ("a3po", "ppo_clip", "token-mean")
        assert (algorithm.loss.settings.clip_ratio_low, algorithm.loss.settings.clip_ratio_high) == (0.2, 0.28)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("reference", sorted(REPO.glob("configs/baselines/reference/*.yaml")), ids=lambda p: p.stem)
def test_reference_presets_are_valid_16_gpu_jobs_on_every_setup(path, reference, tmp_path):
    """The released-script overlays (32 or 512 prompts, KL to the start policy) validate on each paper setup."""
    cfg, _ = C.parse_args(["--config", str(path), "--config", str(reference), *_paper_overrides(path, tmp_path)])
    if cfg.model.fp8_format is None:
        cfg = resolve_job(cfg, 16).cfg
    assert resolve_algorithm(cfg.rl).regularisers.kl_coef == 0.001 and cfg.rl.algorithm == reference.stem


def test_dry_run_prints_layout_and_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "megatron_a3po.train", "--config", str(REPO / "configs/tiny_cpu.yaml"),
                           "--tiny-model", "qwen2", "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 0, proc.stderr
    assert "layout: world=2 TP=2 PP=1 CP=1 DP=1 rollout TP=1; algorithm a3po" in proc.stdout


def test_metrics_logger_and_plot(tmp_path):
    from megatron_a3po.cli import a3po
    from megatron_a3po.metrics import MetricsLogger, read_jsonl

    logger = MetricsLogger(str(tmp_path), config={})
    for step in range(1, 4):
        logger.log(step, {"reward/mean": 0.1 * step, "pos/entropy": 1.0 / step, "neg/entropy": 1.2 / step,
                          "pos/length": 3.0, "neg/length": 4.0})
    logger.log(3, {"val/avg@k": 0.5, "val/pass@k": 0.9})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 3]
    assert a3po(["plot", str(tmp_path)]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert a3po(["plot", str(tmp_path / "missing")]) == 2
