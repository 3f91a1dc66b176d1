"""Training checkpoints: save and exact resume (run guards live in guards.py).

A training checkpoint `--save DIR/step_XXXXXX/` is a converted Megatron checkpoint plus the training state:

    metadata.json, .metadata, *.distcp   the model (megatron_ckpt.save_model: dist_checkpointing torch_dist)
    a3po_metadata.json, hf/              as written by `a3po-convert`: the directory also loads as a converted
                                         checkpoint (weights only), at any TP/PP
    optimizer/                           Megatron optimizer `sharded_state_dict` via dist_checkpointing
    rank_state/rank_XXXXX.pt             per-rank RNG states (python, numpy, torch CPU, megatron's RNG tracker),
                                         tensors and numbers only (read with weights_only=True)
    config.json                          the resolved config of the run that wrote it
    a3po_train_state.json                the marker, written last: RL step, LR scheduler, data sampler, layout

Saving survives a crash at any instant (checkpoint_files.py has the protocol): every rank writes into
`DIR/.tmp_step_XXXXXX` and fsyncs, rank 0 writes the marker with a manifest of every file, sets an existing
`step_XXXXXX` aside, renames the new one in, swaps `latest`, removes the aside copy, then applies retention
(`--keep-last-checkpoints`, `--keep-checkpoint-interval`). Before writing, every rank checks its free space and
all refuse together when one lacks it. Resuming from a --save dir verifies the checkpoint `latest` names (every
manifest file present, with its size) and falls back to the newest complete one with a warning.

`--load` accepts a training checkpoint, a `--save` directory (follows `latest`), or a converted checkpoint.
A training checkpoint resumes everything when the parallel layout (world size, TP, PP, VPP, CP) is unchanged;
at another layout everything but the per-rank RNG states is restored (weights and optimizer re-sharded).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_a3po import checkpoint_files as files
from megatron_a3po import optimizer_state
from megatron_a3po.checkpoint_files import LATEST, MARKER, step_dir_name
from megatron_a3po.errors import CheckpointError

FORMAT = "megatron-a3po/train-state"
FORMAT_VERSION = 2  # 2: a file manifest in the marker, RNG states as tensors
OPTIMIZER_DIR = "optimizer"
RANK_STATE_DIR = "rank_state"
# Settings that may change on resume without making it inexact-by-design.
RESUME_FREE_SETTINGS = {("training", "load"), ("training", "ref_load"), ("training", "save"),
                        ("training", "save_interval"), ("training", "train_iters"), ("rl", "train_steps"),
                        ("rl", "output_dir"),
                        ("rl", "export_hf"), ("rl", "wandb_project"), ("rl", "wandb_run_name"),
                        ("rl", "max_consecutive_nan_steps"), ("model", "hf_path"), ("model", "tiny_model"),
                        ("training", "keep_last_checkpoints"), ("training", "keep_checkpoint_interval"),
                        ("training", "allow_config_change")}


# ---- what --load points at ---------------------------------------------------------------------------------


def resolve_load_dir(path: str | Path) -> tuple[Path, bool]:
    """(checkpoint dir, is_training_checkpoint) for a --load argument; refuse anything else."""
    from megatron_a3po.models.megatron_ckpt import METADATA_FILE

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--load {path}: not a directory; pass a checkpoint directory from --save or "
                              "`a3po-convert hf-to-megatron`")
    if (path / MARKER).is_file():
        missing = files.problems(path)
        if missing:
            raise CheckpointError(f"--load {path}: the checkpoint is incomplete ({'; '.join(missing[:3])}); pass "
                                  f"its --save directory to resume from the newest complete one")
        return path, True
    if (path / LATEST).is_file() or files.committed_steps(path):  # a --save dir (latest may be missing: a crash)
        target, warnings = files.find_resumable(path)
        if target is None:
            raise CheckpointError(f"--load {path}: no complete checkpoint in it ({'; '.join(warnings[-3:])}); "
                                  "start fresh with another --save directory")
        if os.environ.get("RANK", "0") == "0":
            for warning in warnings:
                files.warn(warning)
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
    warnings, changed = [], []
    saved, now = state["config"], cfg.to_dict()
    for section, values in saved.items():
        for key, value in values.items():
            if (section, key) in RESUME_FREE_SETTINGS or section not in now or key not in now[section]:
                continue
            if now[section][key] != value:
                difference = f"{section}.{key}: checkpoint {value!r}, now {now[section][key]!r}"
                (changed if _defines_the_run(section, key) else warnings).append(difference)
    if changed and not cfg.training.allow_config_change:
        raise CheckpointError(f"--load {ckpt_dir} is a run of another algorithm or model setup ({'; '.join(changed)})."
                              " Continuing it under new settings mixes two experiments in one run: start a new run "
                              "(its own --save / --output-dir), or pass --allow-config-change to resume anyway")
    return warnings + changed


# What makes a run the experiment it is: changing these on resume is an error unless --allow-config-change.
_RUN_DEFINING = {
    "model": ("bf16", "fp16", "fp8_format", "fp8_recipe"),
    "rl": ("algorithm", "advantage_estimator", "token_shaper", "policy_loss", "loss_agg_mode", "clip_ratio_low",
           "clip_ratio_high", "dual_clip_c", "entropy_coef", "kl_coef", "kl_type", "rollout_correction",
           "use_rollout_logprobs", "reward", "dataset"),
}


def _defines_the_run(section: str, key: str) -> bool:
    return key in _RUN_DEFINING.get(section, ()) or (section == "rl" and key.startswith("a3po_"))


# ---- save -------------------------------------------------------------------------------------------------


def layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size()}


def rng_state() -> dict:
    """Every RNG this rank draws from, as tensors and plain numbers: loadable with torch.load(weights_only=True),
    so reading a checkpoint's rank state runs no pickled code."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "tracker": {name: state.cpu()
                        for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()}}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


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
        tmp = self.save_dir / f"{files.TMP_PREFIX}{final.name}"
        self._check_free_space()  # every rank, before anything is written: all refuse together
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for note in files.clean_stale(self.save_dir):
                print(f"checkpoint: {note}", flush=True)
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
        files.fsync_tree(tmp)  # this rank's files are durable before rank 0 writes the marker
        files.kill_point(f"save_rank{rank}_written")
        dist.barrier()
        if rank == 0:
            self._write_metadata(tmp)
            (tmp / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str) + "\n")
            state = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "layout": layout(),
                     "scheduler": self.policy.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                     "config": self.cfg.to_dict(), **(extra or {})}
            files.commit(tmp, final, state)
            t = self.cfg.training
            for removed in files.retain(self.save_dir, t.keep_last_checkpoints, t.keep_checkpoint_interval):
                print(f"checkpoint: removed {removed.name} (--keep-last-checkpoints {t.keep_last_checkpoints})",
                      flush=True)
        dist.barrier()
        self.last_saved = step
        return final

    def _check_free_space(self) -> None:
        """Collective: every rank compares its filesystem's free space with the checkpoint's expected size (the
        last checkpoint's, else weights + fp32 master + Adam moments); if any lacks it, all raise together (no
        rank left waiting in a barrier while another fails mid-write)."""
        last, _ = files.find_resumable(self.save_dir) if self.save_dir.is_dir() else (None, [])
        if last is not None:
            need = sum(json.loads((last / MARKER).read_text()).get("manifest", {}).values())
        else:
            need = 0
        if not need:
            local = sum(p.numel() * (p.element_size() + 12) for c in self.policy.chunks for p in c.parameters())
            need = local * dist.get_world_size()
        need = int(need * 1.1)
        free = files.free_bytes(self.save_dir)
        report = [None] * dist.get_world_size()
        dist.all_gather_object(report, (free, socket.gethostname()))
        short = [(r, f, host) for r, (f, host) in enumerate(report) if f < need]
        if short:
            rank, free, host = short[0]
            raise CheckpointError(
                f"--save {self.save_dir}: {free / 2**30:.2f} GiB free for rank {rank} (host {host}), a checkpoint "
                f"needs about {need / 2**30:.2f} GiB; nothing was written. Free space, lower "
                "--keep-last-checkpoints, or point --save at a larger filesystem; resume from the last complete "
                "checkpoint with --load")

    def _write_metadata(self, ckpt_dir: Path) -> None:
        from megatron_a3po.models import megatron_ckpt

        from megatron_a3po.dtypes import dtype_name
        from megatron_a3po.models.hf_io import copy_side_files

        files = copy_side_files(self.tokenizer_dir, ckpt_dir / megatron_ckpt.HF_FILES_DIR)
        m, p = self.cfg.model, self.cfg.parallel
        megatron_ckpt.CheckpointMeta(
            arch=self.policy.arch, hf_config=self.hf_config, dtype=dtype_name(self.policy.dtype),
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
        policy.weights_loaded()  # a fresh bf16 optimizer's fp32 main params must be the loaded weights
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
    try:
        state = torch.load(rank_file, weights_only=True)["rng"]  # tensors and numbers only: no pickled code runs
        set_rng_state(state)
    except (pickle.UnpicklingError, KeyError, TypeError, IndexError) as err:
        print(f"warning: {rank_file}: not loaded ({type(err).__name__}: {str(err)[:120]}; a checkpoint from before "
              "RNG states were stored as tensors, or not ours): this rank's RNG states start fresh", file=sys.stderr)
        return False
    return True
