"""The optimizer's part of a training checkpoint: megatron-core's `sharded_state_dict` through dist_checkpointing.

Both optimizer formats hold per-parameter state sharded like the parameters, so a checkpoint loads at another
TP/PP/DP. Two fixes for megatron-core's DistributedOptimizer when it runs on torch's Adam (no apex/TE: CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The distributed optimizer's default format ("fully_sharded_model_space") uses flattened ShardedTensor ranges,
# which this megatron-core's dist_checkpointing refuses to save; "dp_reshardable" keeps the optimizer's bucket
# layout and re-shards along DP only. "fully_reshardable" is canonical per-parameter state, loadable at any
# TP/PP/DP (tests/test_train_layouts.py resumes TP=2 -> PP=2). Its save gathers each bucket's state in
# DistributedOptimizer.get_parameter_state_dp_zero (megatron/core/optimizer/distrib_optimizer.py), called by
# sharded_param_state_fully_reshardable with what the "mem_efficient" key below selects:
# - off (megatron-core's default): an NCCL all_gather into device buffers of the whole bucket (one bucket per
#   buffer here: overlap_grad_reduce is off) per state key, and every DP rank keeps host copies of all states
#   (fp32 param, exp_avg, exp_avg_sq: 12 bytes x the rank's model-parallel shard of parameters). On Qwen2.5-32B
#   (TP 8, DP 2, 4.1B params per GPU) that is 15 GiB of receive buffers + 8 GiB for the send copy on the device,
#   on top of an awake vLLM, and ~49 GB of host memory on every rank.
# - on: a gather over the gloo DP group into host buffers on DP rank 0 only, returned (and written) by DP rank 0;
#   no device buffer at all, and DP ranks > 0 only hold their own shards. DP rank 0's host peak is the same
#   (12 bytes/param of world tensors + 3 host buckets in flight: planner.save_host_bytes counts them). The gloo
#   group is megatron-core's own (initialize_model_parallel creates it by default; get_parameter_state_dp_zero
#   asserts it exists, which the DP=2 test in tests/test_optimizer_dp.py runs).
# Loading is the same in both ("interchangeable from MCore's perspective", says its docstring).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


def sharded_state(policy, is_loading: bool = False) -> dict:
    from megatron_a3po.models.megatron_ckpt import sharded_state_dict

    state = policy.optimizer.sharded_state_dict(sharded_state_dict(policy.chunks), is_loading=is_loading,
                                                metadata=OPTIMIZER_METADATA)
    _drop_empty_param_state(state)
    return state


def _drop_empty_param_state(state: dict) -> None:
    """The memory-efficient save returns param_state None on DP ranks > 0 (DP rank 0 writes it); left in, that
    None is a key only they have in the common state, which dist_checkpointing reports on every save."""
    if state.get("param_state", {}) is None:
        del state["param_state"]
    for value in state.values():  # a ChainedOptimizer nests one state dict per optimizer
        if isinstance(value, dict):
            _drop_empty_param_state(value)


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
