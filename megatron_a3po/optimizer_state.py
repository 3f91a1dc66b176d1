"""The optimizer's part of a training checkpoint: megatron-core's `sharded_state_dict` through dist_checkpointing.

Both optimizer formats hold per-parameter state sharded like the parameters, so a checkpoint loads at another
TP/PP/DP. Two fixes for megatron-core's DistributedOptimizer when it runs on torch's Adam (no apex/TE: CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The distributed optimizer's default format ("fully_sharded_model_space") uses flattened ShardedTensor ranges,
# which this megatron-core's dist_checkpointing refuses to save; "fully_reshardable" is canonical per-parameter
# state (gathered on DP rank 0 of each model-parallel group), loadable at any TP/PP/DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def sharded_state(policy, is_loading: bool = False) -> dict:
    from megatron_a3po.models.megatron_ckpt import sharded_state_dict

    return policy.optimizer.sharded_state_dict(sharded_state_dict(policy.chunks), is_loading=is_loading,
                                               metadata=OPTIMIZER_METADATA)


def save(policy, directory: Path) -> None:
    """Collective: every rank writes its shards into `directory` (which must exist)."""
    from megatron.core import dist_checkpointing

    from megatron_a3po.models import megatron_ckpt

    with megatron_ckpt._in_process_write_results():
        dist_checkpointing.save(sharded_state(policy), str(directory))


def load(policy, directory: Path) -> None:
    """Collective: restore the optimizer state saved by `save`, re-sharded to this run's layout."""
    from megatron.core import dist_checkpointing

    from megatron_a3po.models import megatron_ckpt

    _prepare_distributed_optimizer_for_load(policy.optimizer)
    with megatron_ckpt._in_process_write_results():
        loaded = dist_checkpointing.load(sharded_state(policy, is_loading=True), str(directory))
    policy.optimizer.load_state_dict(loaded)
    _untie_adam_steps(policy.optimizer)


def _prepare_distributed_optimizer_for_load(optimizer) -> None:
    """Two gaps of megatron-core's DistributedOptimizer with torch's Adam (no apex/TE, i.e. CPU), whose "step"
    is per-parameter state instead of a param-group entry:
    - a fresh optimizer has no state, and state_dict() (needed to build the load template) asserts on "step";
      one zero-gradient step at lr 0 creates the state without moving a weight (the load overwrites it);
    - the fully_reshardable loader copies every state tensor it finds, "step" included, from a checkpoint that
      keeps step in the param groups (restored separately): the copy is told to skip it."""
    from megatron.core.optimizer import distrib_optimizer as D

    if D.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, D.DistributedOptimizer):
            continue
        if not opt.optimizer.state:
            saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in opt.optimizer.param_groups]
            for group in opt.optimizer.param_groups:
                group["lr"], group["weight_decay"] = 0.0, 0.0
            opt._init_optimizer_states_with_dummy_values()
            for group, (lr, wd) in zip(opt.optimizer.param_groups, saved):
                group["lr"], group["weight_decay"] = lr, wd
        copy_states = opt._set_main_param_and_optimizer_states
        opt._set_main_param_and_optimizer_states = \
            lambda param, tensors, copy_states=copy_states: copy_states(param, {"step": None, **tensors})


def _untie_adam_steps(optimizer) -> None:
    """Without apex/TE, DistributedOptimizer.load_state_dict gives every parameter the *same* "step" tensor, and
    torch's Adam increments each parameter's step in place: one update would advance the shared count once per
    parameter (wrong bias correction from then on). Each parameter gets its own copy."""
    from megatron.core.optimizer import distrib_optimizer as D

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, D.DistributedOptimizer) and not D.HAVE_APEX_OR_TE:
            for state in opt.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
