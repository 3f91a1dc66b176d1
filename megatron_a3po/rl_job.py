"""The RL job on its ranks: from a resolved Job (job.py) to the components RLTrainer drives, then the run.

`main(job)` creates the process groups, takes the run's directories (run_dir.py), builds the Megatron policy,
the colocated vLLM engine, data, reward, metrics, checkpointer and run guards, and hands them to RLTrainer
(trainer.py). The last line printed is `validation accuracy: before 0.xx -> after 0.yy`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_a3po import checkpointing, guards
from megatron_a3po.errors import UserError, report


def main(job) -> int:
    """Collective: every rank calls it with the same Job."""
    from megatron_a3po import parallel

    parallel.init_model_parallel(job.layout.sizes(), seed=job.cfg.training.seed)
    try:
        lock = claim_run_dirs(job)
    except UserError as err:
        parallel.destroy()
        return report(err)
    try:
        return run(job)
    except UserError as err:  # mid-run (a full disk at a save, rewards that cannot be trusted): one line per rank
        return report(err, f"error (rank {parallel.rank()})")
    finally:
        lock.release()


def vllm_model_dir(out: Path, model) -> Path:
    """An HF-style dir vLLM can start from (config + tokenizer of the job's ModelSource); its weights come from
    the first refit."""
    import json

    from megatron_a3po.models.hf_io import copy_side_files
    from megatron_a3po.models.tiny import build_tokenizer

    target = out / "vllm_model"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(model.hf_config, indent=2))
    if model.tokenizer_dir is None:
        build_tokenizer().save_pretrained(target)
    else:
        copy_side_files(model.tokenizer_dir, target)
    return target


def build_data(cfg, tokenizer):
    from megatron_a3po.data import PromptDataset, PromptSampler
    from megatron_a3po.rewards.synthetic import make_arithmetic_dataset

    rl = cfg.rl
    kwargs = dict(max_prompt_length=rl.max_prompt_length, raw_prompt=rl.raw_prompt)
    if rl.dataset.startswith("synthetic:arithmetic"):
        level = int(rl.dataset.rsplit(":", 1)[1]) if rl.dataset.count(":") == 2 else 1
        train = PromptDataset.from_dicts(make_arithmetic_dataset(5000, level, seed=cfg.training.seed), tokenizer,
                                         **kwargs)
        eval_rows = make_arithmetic_dataset(rl.eval_prompts, level, seed=cfg.training.seed + 99991)
        evaluation = PromptDataset.from_dicts(eval_rows, tokenizer, **kwargs)
    else:
        train = PromptDataset.from_files(rl.dataset, tokenizer, **kwargs)
        evaluation = PromptDataset.from_files(rl.eval_dataset or rl.dataset, tokenizer, **kwargs)
    return train, evaluation, PromptSampler(len(train), seed=cfg.training.seed)


def claim_run_dirs(job):
    """Collective: rank 0 checks that a fresh run's --save / --output-dir hold no other run's files and locks
    them (run_dir.py); every rank raises the same ConfigError when it cannot."""
    import torch.distributed as dist

    from megatron_a3po import parallel, run_dir
    from megatron_a3po.errors import ConfigError

    cfg = job.cfg
    lock = run_dir.RunLock([Path(d) for d in (cfg.rl.output_dir, cfg.training.save) if d])
    problems = (run_dir.foreign_files(cfg, job.resuming) or lock.acquire()) if parallel.is_rank0() else []
    box = [problems]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError("; ".join(box[0]))
    return lock


def run(job) -> int:
    """The job on initialised process groups (main() took the run's directories)."""
    from transformers import AutoTokenizer

    from megatron_a3po import metrics, parallel
    from megatron_a3po.data import check_tokenizer_fits
    from megatron_a3po.metrics import MetricsLogger, plot_run
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.rewards import get_reward_fn
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.trainer import RLTrainer

    import torch.distributed as dist

    from megatron_a3po.dtypes import dtype_name

    cfg, arch, hf_cfg = job.cfg, job.arch, job.model.hf_config
    out = Path(cfg.rl.output_dir)
    if parallel.is_rank0():
        vllm_model_dir(out, job.model)
    dist.barrier()
    model_dir = out / "vllm_model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer_fits(tokenizer, arch.vocab_size)
    train_data, eval_data, sampler = build_data(cfg, tokenizer)

    policy = PolicyModel(cfg, arch)
    guards.install_nonfinite_guard(policy.optimizer, policy.chunks)
    start_step, val_before = 1, None
    if job.resuming:
        state, notes = checkpointing.resume(job.resume_dir, policy, sampler)
        start_step, val_before = state["step"] + 1, state.get("val_before")
        if parallel.is_rank0():
            metrics.trim_metrics(out, state["step"])
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
            print(f"resuming from {job.resume_dir} at RL step {start_step}", flush=True)
    elif job.start_checkpoint is not None:
        from megatron_a3po.models.megatron_ckpt import load_model

        load_model(policy.chunks, job.start_checkpoint, arch)
        policy.weights_loaded()  # bf16: the optimizer's fp32 main params were cloned from the random init
    elif cfg.model.hf_path:
        policy.load_hf(cfg.model.hf_path)
    reference = build_reference(cfg, arch, policy, resuming=job.resuming) if cfg.rl.kl_coef > 0 else None
    rollout_dtype = cfg.rl.rollout_dtype if cfg.rl.rollout_dtype != "auto" else dtype_name(policy.dtype)
    if cfg.training.offload_train_during_rollout:  # vLLM sizes its KV cache at start: let it see the freed memory
        policy.offload_train_state()
    engine = RolloutEngine(str(model_dir), rollout_tp=cfg.rl.rollout_tensor_parallel_size,
                           max_model_len=job.rollout_max_model_len,
                           seed=cfg.training.seed, cpu_kv_cache_gb=cfg.rl.rollout_kv_cache_gb,
                           gpu_memory_utilization=cfg.rl.gpu_memory_utilization, dtype=rollout_dtype)
    logger = MetricsLogger(str(out), cfg.to_dict(), cfg.rl.wandb_project, cfg.rl.wandb_run_name)
    checkpointer = checkpointing.Checkpointer(cfg, policy, sampler, hf_cfg, model_dir)
    guard = guards.RunGuard(cfg.rl.max_consecutive_nan_steps)
    guard.install_signal_handler()  # after vLLM's start-up, which installs handlers of its own
    trainer = RLTrainer(cfg, policy=policy, engine=engine, tokenizer=tokenizer, train_data=train_data,
                        eval_data=eval_data, sampler=sampler, reward_fn=get_reward_fn(cfg.rl.reward), logger=logger,
                        on_step_end=_progress if parallel.is_rank0() else None, start_step=start_step,
                        checkpointer=checkpointer, guard=guard, val_before=val_before, reference=reference)
    if job.resuming:
        checkpointing.restore_rng(job.resume_dir)  # last: vLLM's start-up draws from the torch RNG
    before, after = trainer.fit()
    logger.close()
    if trainer.stop_reason is not None:
        return _stopped(cfg, trainer, checkpointer)
    if cfg.rl.export_hf:
        from megatron_a3po.hf_export import export_hf

        export_hf(policy, hf_cfg, model_dir, Path(cfg.rl.export_hf))
    if parallel.is_rank0():
        plot_run(out)
        print(f"metrics: {out / 'metrics.jsonl'}  plot: {out / 'curves.png'}")
        final = f"validation accuracy: before {before:.2f} -> after {after:.2f}"
        (out / "final.txt").write_text(final + "\n")
        print(final, flush=True)
    parallel.destroy()
    return 0


def build_reference(cfg, arch, policy, *, resuming: bool):
    """The frozen reference policy of the KL penalty, in the policy's layout: --ref-load (HF dir or converted
    checkpoint), else the run's starting weights (a copy of the policy as loaded; on resume, --hf-path again)."""
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models.megatron_ckpt import METADATA_FILE, load_model

    reference = PolicyModel(cfg, arch, frozen=True)
    source = cfg.training.ref_load or (cfg.model.hf_path if resuming else None)
    if source is None:
        reference.copy_weights_from(policy)
    elif Path(source, METADATA_FILE).is_file():
        load_model(reference.chunks, source, arch)
    else:
        reference.load_hf(source)
    return reference


def _stopped(cfg, trainer, checkpointer) -> int:
    """A run guard ended training early: SIGTERM -> exit 0 after the checkpoint; NaN/Inf -> exit 3."""
    from megatron_a3po import parallel

    saved = (Path(cfg.training.save) / checkpointing.step_dir_name(checkpointer.last_saved)
             if checkpointer.last_saved is not None else None)
    if parallel.is_rank0():
        if trainer.stop_reason == "preempted":
            print(f"SIGTERM: stopped after the current step; checkpoint: {saved or 'none (no --save DIR given)'}. "
                  "Resume with --load " + (cfg.training.save or "CHECKPOINT"), flush=True)
        else:
            print(f"error: {cfg.rl.max_consecutive_nan_steps} RL steps in a row had non-finite (NaN/Inf) loss or "
                  f"gradients, their updates were skipped; stopped. Last good checkpoint: {saved or 'none'}. "
                  "Lower --lr, check the data / reward, or raise --max-consecutive-nan-steps", file=sys.stderr,
                  flush=True)
    parallel.destroy()
    return 0 if trainer.stop_reason == "preempted" else 3


def _progress(step: int, m: dict) -> None:
    nan = float("nan")
    print(f"[step {step}] reward {m.get('reward/mean', nan):.3f} acc {m.get('reward/accuracy', nan):.3f} "
          f"len {m.get('response/length_mean', nan):.1f} entropy {m.get('entropy', nan):.3f} "
          f"grad_norm {m.get('train/grad_norm', nan):.3f} mismatch {m.get('mismatch/logp_abs_mean', nan):.1e} "
          f"pos/neg {m.get('pos/count', 0):.0f}/{m.get('neg/count', 0):.0f}  "
          + " ".join(f"{k[5:]} {v:.1f}s" for k, v in m.items() if k.startswith("time/")), flush=True)


