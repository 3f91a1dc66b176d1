"""Training checkpoints (save / exact resume) and run guards (non-finite updates, preemption).

A training checkpoint `--save DIR/step_XXXXXX/` is a converted Megatron checkpoint plus the training state:

    metadata.json, .metadata, *.distcp   the model (megatron_ckpt.save_model: dist_checkpointing torch_dist)
    a3po_metadata.json, hf/              as written by `a3po-convert`: the directory also loads as a converted
                                         checkpoint (weights only), at any TP/PP
    optimizer/                           Megatron optimizer `sharded_state_dict` via dist_checkpointing
    rank_state/rank_XXXXX.pt             per-rank RNG states (python, numpy, torch CPU, megatron's RNG tracker)
    config.json                          the resolved config of the run that wrote it
    a3po_train_state.json                the marker, written last: RL step, LR scheduler, data sampler, layout

Saving is atomic: every rank writes into `DIR/.tmp_step_XXXXXX`, a barrier, then rank 0 renames it to
`step_XXXXXX` and finally rewrites `DIR/latest` (the step dir name) through a rename. A crash at any moment
leaves the previous checkpoint and `latest` intact.

`--load` accepts a training checkpoint, a `--save` directory (follows `latest`), or a converted checkpoint.
A training checkpoint resumes everything when the parallel layout (world size, TP, PP, VPP, CP) is unchanged;
at another layout everything but the per-rank RNG states is restored (weights and optimizer re-sharded).

Run guards: `install_nonfinite_guard` makes the Megatron optimizer skip (and report grad_norm nan,
update_successful False) any update whose gradients hold NaN/Inf on any rank - megatron-core's fp32 / bf16
optimizers do not check that themselves; `RunGuard` counts consecutive steps with skipped updates and turns
SIGTERM into a flag the trainer checks after each step.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_a3po import optimizer_state, platform
from megatron_a3po.config import ConfigError

MARKER = "a3po_train_state.json"
LATEST = "latest"
FORMAT = "megatron-a3po/train-state"
FORMAT_VERSION = 1
OPTIMIZER_DIR = "optimizer"
RANK_STATE_DIR = "rank_state"
# Settings that may change on resume without making it inexact-by-design.
RESUME_FREE_SETTINGS = {("training", "load"), ("training", "save"), ("training", "save_interval"),
                        ("training", "train_iters"), ("rl", "train_steps"), ("rl", "output_dir"),
                        ("rl", "export_hf"), ("rl", "wandb_project"), ("rl", "wandb_run_name"),
                        ("rl", "max_consecutive_nan_steps"), ("model", "hf_path"), ("model", "tiny_model")}


class CheckpointError(ConfigError):
    """A --load / --save directory that cannot be used; the message names the problem and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---- what --load points at ---------------------------------------------------------------------------------


def resolve_load_dir(path: str | Path) -> tuple[Path, bool]:
    """(checkpoint dir, is_training_checkpoint) for a --load argument; refuse anything else."""
    from megatron_a3po.models.megatron_ckpt import METADATA_FILE

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--load {path}: not a directory; pass a checkpoint directory from --save or "
                              "`a3po-convert hf-to-megatron`")
    if (path / MARKER).is_file():
        return path, True
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        target = path / name
        if not name or not (target / MARKER).is_file():
            raise CheckpointError(f"--load {path}: {path / LATEST} names {name!r}, which is not a complete training "
                                  f"checkpoint; pass one of the step_* directories in {path} explicitly")
        return target, True
    if (path / METADATA_FILE).is_file():
        return path, False
    steps = sorted(p.name for p in path.glob("step_*") if (p / MARKER).is_file())
    partial = sorted(p.name for p in path.glob(".tmp_step_*"))
    hint = (f"; it holds complete checkpoints {steps}, pass one of them" if steps else
            f"; it only holds interrupted saves {partial}, which cannot be resumed" if partial else "")
    raise CheckpointError(
        f"--load {path}: neither a training checkpoint ({MARKER}, written by --save), a --save directory (with a "
        f"`{LATEST}` file) nor a converted checkpoint ({METADATA_FILE}, from `a3po-convert hf-to-megatron`){hint}"
    )


def read_train_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / MARKER
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); resume from an earlier step_* checkpoint") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r} is not {FORMAT!r}; not a training checkpoint")
    if state.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer megatron-a3po (version {state['version']}); upgrade")
    return state


def check_resume(cfg, ckpt_dir: Path, state: dict, requested_arch=None) -> list[str]:
    """Refuse resumes that cannot work; return warnings for settings that differ from the saved run."""
    from megatron_a3po.models.megatron_ckpt import arch_differences, read_meta

    arch = read_meta(ckpt_dir).arch
    if requested_arch is not None:
        diffs = arch_differences(requested_arch, arch, "the model flags (--tiny-model / --hf-path)",
                                 f"checkpoint {ckpt_dir}")
        if diffs:
            raise CheckpointError(f"--load {ckpt_dir} holds a different model: {'; '.join(diffs)}. Drop --tiny-model"
                                  " / --hf-path when resuming (the checkpoint defines the model), or start fresh "
                                  "without --load")
    if state["step"] >= cfg.rl.train_steps:
        raise CheckpointError(f"--load {ckpt_dir}: the checkpoint is at RL step {state['step']}, which already "
                              f"reaches --train-steps {cfg.rl.train_steps}; raise --train-steps to train further")
    warnings = []
    saved, now = state["config"], cfg.to_dict()
    for section, values in saved.items():
        for key, value in values.items():
            if (section, key) in RESUME_FREE_SETTINGS or section not in now or key not in now[section]:
                continue
            if now[section][key] != value:
                warnings.append(f"{section}.{key}: checkpoint {value!r}, now {now[section][key]!r}")
    return warnings


# ---- save -------------------------------------------------------------------------------------------------


def layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size()}


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class Checkpointer:
    """Writes `save_dir/step_XXXXXX` checkpoints (collective: every rank calls save)."""

    def __init__(self, cfg, policy, sampler, hf_config: dict, tokenizer_dir: Path):
        self.cfg, self.policy, self.sampler = cfg, policy, sampler
        self.hf_config, self.tokenizer_dir = hf_config, Path(tokenizer_dir)
        self.save_dir = Path(cfg.training.save) if cfg.training.save else None
        self.interval = cfg.training.save_interval
        self.last_saved: int | None = None

    def due(self, step: int) -> bool:
        return bool(self.save_dir and self.interval and step % self.interval == 0)

    def save(self, step: int, extra: dict | None = None) -> Path | None:
        from megatron_a3po.models import megatron_ckpt

        if self.save_dir is None or self.last_saved == step:
            return None
        rank = dist.get_rank()
        final = self.save_dir / step_dir_name(step)
        tmp = self.save_dir / f".tmp_{step_dir_name(step)}"
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        megatron_ckpt.save_model(self.policy.chunks, tmp)  # first: dist_checkpointing wants an empty dir
        dist.barrier()
        if rank == 0:
            (tmp / OPTIMIZER_DIR).mkdir()
            (tmp / RANK_STATE_DIR).mkdir()
        dist.barrier()
        optimizer_state.save(self.policy, tmp / OPTIMIZER_DIR)
        torch.save({"rng": rng_state()}, tmp / RANK_STATE_DIR / f"rank_{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            self._write_metadata(tmp)
            state = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "layout": layout(),
                     "scheduler": self.policy.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                     "config": self.cfg.to_dict(), **(extra or {})}
            (tmp / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str) + "\n")
            (tmp / MARKER).write_text(json.dumps(state, indent=2, default=str) + "\n")  # last: marks it complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.save_dir / f".{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.save_dir / LATEST)
        dist.barrier()
        self.last_saved = step
        return final

    def _write_metadata(self, ckpt_dir: Path) -> None:
        from megatron_a3po.models import megatron_ckpt

        hf_dir = ckpt_dir / megatron_ckpt.HF_FILES_DIR
        hf_dir.mkdir()
        files = []
        for f in sorted(self.tokenizer_dir.iterdir()):
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "config.json":
                shutil.copy(f, hf_dir / f.name)
                files.append(f.name)
        m, p = self.cfg.model, self.cfg.parallel
        megatron_ckpt.CheckpointMeta(
            arch=self.policy.arch, hf_config=self.hf_config, dtype=str(self.policy.dtype).replace("torch.", ""),
            padded_vocab_size=self.policy.padded_vocab, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
            saved_tensor_parallel_size=p.tensor_model_parallel_size,
            saved_pipeline_parallel_size=p.pipeline_model_parallel_size, hf_files=tuple(files),
        ).write(ckpt_dir)


# ---- resume -----------------------------------------------------------------------------------------------


def resume(ckpt_dir: str | Path, policy, sampler) -> tuple[dict, list[str]]:
    """Collective: restore weights, optimizer, scheduler and sampler (RNG: restore_rng). Returns (state, notes)."""
    from megatron_a3po.models import megatron_ckpt

    ckpt_dir = Path(ckpt_dir)
    state = read_train_state(ckpt_dir)
    megatron_ckpt.load_model(policy.chunks, ckpt_dir, policy.arch)
    notes = []
    # The schedule length follows this run's --train-steps; only the position comes from the checkpoint.
    policy.scheduler.override_opt_param_scheduler = True
    policy.scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    # Either optimizer format re-shards to another TP/PP/DP, but the two formats differ from each other.
    saved_dist_opt = state.get("config", {}).get("training", {}).get("use_distributed_optimizer", False)
    if saved_dist_opt == policy.cfg.training.use_distributed_optimizer:
        optimizer_state.load(policy, ckpt_dir / OPTIMIZER_DIR)
    else:
        notes.append(f"--use-distributed-optimizer changed ({saved_dist_opt} -> "
                     f"{policy.cfg.training.use_distributed_optimizer}): the optimizer state starts fresh")
    if state["layout"] != layout():
        notes.append(f"parallel layout changed ({state['layout']} -> {layout()}): the checkpoint was re-sharded; "
                     "per-rank RNG states start fresh")
    return state, notes


def restore_rng(ckpt_dir: str | Path) -> bool:
    """Per-rank RNG states; call last before training (vLLM's start-up draws from the torch RNG)."""
    ckpt_dir = Path(ckpt_dir)
    if read_train_state(ckpt_dir)["layout"] != layout():
        return False
    rank_file = ckpt_dir / RANK_STATE_DIR / f"rank_{dist.get_rank():05d}.pt"
    set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return True


def trim_metrics(output_dir: str | Path, step: int) -> None:
    """Drop metrics.jsonl rows after `step` (written by the interrupted run after its last checkpoint)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ---- run guards -------------------------------------------------------------------------------------------


def install_nonfinite_guard(optimizer, chunks) -> None:
    """Make `optimizer.step()` skip the update when any rank's gradients hold NaN/Inf.

    It reads the gradients megatron-core steps with: the DDP grad buffers of `chunks` (every parameter's
    `main_grad`, already reduced across DP). With bf16 params or the distributed optimizer the optimizer's own
    parameters get their grads only inside `step()`, so reading those beforehand would see nothing.
    Skipped steps return (False, nan, None) - the same as megatron-core's own fp16 overflow skip - so
    `PolicyModel.optimizer_step` reports update_successful=False, grad_norm nan.
    """
    step = optimizer.step
    grad_buffers = [buffer.grad_data for chunk in chunks
                    for buffer in [*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", [])]]

    @torch.no_grad()
    def guarded_step():
        bad = torch.zeros(1, device=platform.device())
        for grads in grad_buffers:  # device-side reduction: one host sync per step, below
            bad = torch.maximum(bad, (~torch.isfinite(grads).all()).float().reshape(1))
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            optimizer.zero_grad()
            return False, float("nan"), None
        return step()

    optimizer.step = guarded_step


def injected_nan_step() -> int | None:
    """Test hook: A3PO_TEST_INJECT_NAN_STEP=k[,j...] makes the policy loss NaN at those RL steps."""
    value = os.environ.get("A3PO_TEST_INJECT_NAN_STEP", "")
    return {int(v) for v in value.split(",") if v.strip()} or None


class RunGuard:
    """Stop conditions checked after every step: SIGTERM (preemption) and too many non-finite steps."""

    def __init__(self, max_consecutive_nan_steps: int):
        self.max_nan = max_consecutive_nan_steps
        self.consecutive_nan = 0
        self.terminate = False
        self.reason: str | None = None

    def install_signal_handler(self) -> None:
        def on_sigterm(signum, frame):
            self.terminate = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def check(self, step: int, metrics: dict) -> str | None:
        """Collective. None to continue, else 'preempted' or 'nonfinite' (every rank gets the same answer)."""
        bad = metrics.get("train/skipped_updates", 0) > 0 or not math.isfinite(metrics.get("train/grad_norm", 0.0))
        self.consecutive_nan = self.consecutive_nan + 1 if bad else 0
        flag = torch.tensor([1.0 if self.terminate else 0.0], device=platform.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.reason = "preempted"
        elif self.max_nan and self.consecutive_nan >= self.max_nan:
            self.reason = "nonfinite"
        return self.reason
