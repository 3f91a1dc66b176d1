"""Main job: `torchrun --nproc-per-node N -m megatron_a3po.train --config configs/X.yaml [Megatron/RL flags]`.

Validates everything before any process group exists, builds the components (Megatron policy, colocated vLLM,
data, reward, metrics) and hands them to RLTrainer. The last line printed is
`validation accuracy: before 0.xx -> after 0.yy`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from megatron_a3po import checkpointing, guards
from megatron_a3po import config as C
from megatron_a3po.rl_config import resolve_algorithm


def resolve_model(cfg) -> tuple[object, dict, Path | None]:
    """(ModelArch, HF config dict, tokenizer dir) from --load (converted Megatron checkpoint) or --hf-path."""
    from megatron_a3po.models import families, tiny

    if cfg.training.load:
        from megatron_a3po.models.megatron_ckpt import HF_FILES_DIR, read_meta

        meta = read_meta(cfg.training.load)
        return meta.arch, meta.hf_config, Path(cfg.training.load) / HF_FILES_DIR
    if cfg.model.hf_path:
        arch, hf_cfg = families.load_hf_arch(cfg.model.hf_path)
        return arch, hf_cfg, Path(cfg.model.hf_path)
    hf_cfg = tiny.hf_config(cfg.model.tiny_model).to_dict()
    return families.arch_from_hf_config(hf_cfg), hf_cfg, None


def validate_all(cfg, world_size: int) -> object:
    """Every check that can run before a process group exists; returns the ModelArch."""
    from megatron_a3po.rl_config import validate_rl

    if not (cfg.model.hf_path or cfg.model.tiny_model or cfg.training.load):
        raise C.ConfigError("give a model: --load MEGATRON_CKPT (from a3po-convert), --hf-path HF_DIR, "
                            "or --tiny-model llama|qwen2|qwen3")
    C.validate_numbers(cfg)  # first: nan / inf and out-of-range numbers pass most later comparisons unnoticed
    p, rl = cfg.parallel, cfg.rl
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    # In RL the optimizer-step batch is a PPO mini-batch (prompts x responses) and the LR schedule runs over every
    # update of every step: Megatron's --global-batch-size / --train-iters are derived from them, so the RL
    # checks (which name the RL flags) run first.
    if model_parallel > 0 and world_size % model_parallel == 0:
        validate_rl(rl, world_size=world_size, dp=world_size // model_parallel,
                    micro_batch_size=1 if cfg.training.max_tokens_per_gpu else cfg.training.micro_batch_size)
    cfg.training.global_batch_size = rl.ppo_mini_batch_size * rl.rollout_n
    cfg.training.train_iters = rl.train_steps * max(rl.rollout_batch_size // rl.ppo_mini_batch_size, 1) * rl.ppo_epochs
    if cfg.training.load and not Path(cfg.training.load).exists():
        raise C.ConfigError(f"--load {cfg.training.load}: path does not exist; convert an HF model with "
                            "`a3po-convert hf-to-megatron` or drop --load")
    resume_state = None
    if cfg.training.load:  # a converted checkpoint, a training checkpoint, or a --save dir (follows `latest`)
        ckpt, resuming = checkpointing.resolve_load_dir(cfg.training.load)
        cfg.training.load = str(ckpt)
        resume_state = checkpointing.read_train_state(ckpt) if resuming else None
    arch, _, _ = resolve_model(cfg)
    if resume_state is not None and cfg.rl.kl_coef > 0 and not (cfg.training.ref_load or cfg.model.hf_path):
        raise C.ConfigError("resuming with --kl-coef > 0 needs the reference policy's weights: pass --ref-load DIR "
                            "(the HF model or converted checkpoint the run started from) or --hf-path")
    if resume_state is not None:
        requested = None
        if cfg.model.hf_path or cfg.model.tiny_model:
            load, cfg.training.load = cfg.training.load, None
            requested = resolve_model(cfg)[0]
            cfg.training.load = load
        for warning in checkpointing.check_resume(cfg, Path(cfg.training.load), resume_state, requested):
            if os.environ.get("RANK", "0") == "0":
                print(f"warning: resuming with a changed setting ({warning}); the resumed run is not an exact "
                      "continuation", file=sys.stderr)
    placeholder = cfg.training.load and not (cfg.model.hf_path or cfg.model.tiny_model)
    if placeholder:
        cfg.model.tiny_model = "checkpoint"  # satisfies the one-model-source check; --load decides the model
    try:
        C.validate(cfg, world_size=world_size, arch=arch)
    finally:
        if placeholder:
            cfg.model.tiny_model = None
    return arch


def vllm_model_dir(out: Path, hf_cfg: dict, tokenizer_dir: Path | None) -> Path:
    """An HF-style dir vLLM can start from (config + tokenizer); its weights come from the first refit."""
    from megatron_a3po.models.tiny import build_tokenizer

    target = out / "vllm_model"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if tokenizer_dir is None:
        build_tokenizer().save_pretrained(target)
    else:
        for f in tokenizer_dir.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "config.json":
                shutil.copy(f, target / f.name)
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


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = C.parse_args(sys.argv[1:] if argv is None else argv, description=__doc__)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        arch = validate_all(cfg, world_size)
    except (C.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        p = cfg.parallel
        tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        print(f"layout: world={world_size} TP={tp} PP={pp} CP={cp} DP={world_size // (tp * pp * cp)} "
              f"rollout TP={cfg.rl.rollout_tensor_parallel_size}; algorithm {cfg.rl.algorithm} -> "
              f"{resolve_algorithm(cfg.rl).describe()}")
        return 0
    from megatron_a3po import parallel

    p = cfg.parallel
    parallel.init_model_parallel(parallel.ParallelSizes(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
        C.virtual_pipeline_size(cfg, arch.num_layers), p.context_parallel_size), seed=cfg.training.seed)
    try:
        lock = claim_run_dirs(cfg)
    except C.ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        parallel.destroy()
        return 2
    try:
        return run(cfg, arch)
    finally:
        lock.release()


def claim_run_dirs(cfg):
    """Collective: rank 0 checks that a fresh run's --save / --output-dir hold no other run's files and locks
    them (run_dir.py); every rank raises the same ConfigError when it cannot."""
    import torch.distributed as dist

    from megatron_a3po import parallel, run_dir

    resuming = bool(cfg.training.load) and checkpointing.resolve_load_dir(cfg.training.load)[1]
    lock = run_dir.RunLock([Path(d) for d in (cfg.rl.output_dir, cfg.training.save) if d])
    problems = (run_dir.foreign_files(cfg, resuming) or lock.acquire()) if parallel.is_rank0() else []
    box = [problems]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise C.ConfigError("; ".join(box[0]))
    return lock


def run(cfg, arch) -> int:
    """The job on initialised process groups (main() took the run's directories)."""
    from transformers import AutoTokenizer

    from megatron_a3po import parallel
    from megatron_a3po.data import check_tokenizer_fits
    from megatron_a3po.metrics import MetricsLogger, plot_run
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.rewards import get_reward_fn
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.trainer import RLTrainer

    out = Path(cfg.rl.output_dir)
    _, hf_cfg, tok_dir = resolve_model(cfg)
    model_dir = vllm_model_dir(out, hf_cfg, tok_dir) if parallel.is_rank0() else None
    import torch.distributed as dist

    dist.barrier()
    model_dir = out / "vllm_model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer_fits(tokenizer, arch.vocab_size)
    train_data, eval_data, sampler = build_data(cfg, tokenizer)

    policy = PolicyModel(cfg, arch)
    guards.install_nonfinite_guard(policy.optimizer, policy.chunks)
    start_step, val_before, resume_dir = 1, None, None
    if cfg.training.load:
        resume_dir, resuming = checkpointing.resolve_load_dir(cfg.training.load)
        if resuming:
            state, notes = checkpointing.resume(resume_dir, policy, sampler)
            start_step, val_before = state["step"] + 1, state.get("val_before")
            if parallel.is_rank0():
                checkpointing.trim_metrics(out, state["step"])
                for note in notes:
                    print(f"warning: {note}", file=sys.stderr)
                print(f"resuming from {resume_dir} at RL step {start_step}", flush=True)
        else:
            from megatron_a3po.models.megatron_ckpt import load_model

            load_model(policy.chunks, cfg.training.load, arch)
            resume_dir = None
    elif cfg.model.hf_path:
        policy.load_hf(cfg.model.hf_path)
    reference = build_reference(cfg, arch, policy, resuming=resume_dir is not None) if cfg.rl.kl_coef > 0 else None
    rollout_dtype = cfg.rl.rollout_dtype if cfg.rl.rollout_dtype != "auto" else str(policy.dtype).replace("torch.", "")
    engine = RolloutEngine(str(model_dir), rollout_tp=cfg.rl.rollout_tensor_parallel_size,
                           max_model_len=cfg.rl.max_prompt_length + cfg.rl.max_response_length + 8,
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
    if resume_dir is not None:
        checkpointing.restore_rng(resume_dir)  # last: vLLM's start-up draws from the torch RNG
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


if __name__ == "__main__":
    sys.exit(main())
