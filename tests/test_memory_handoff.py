"""Memory handoff between rollout and training (issue 24, item 6).

- Megatron side: `PolicyModel.offload_train_state` / `restore_train_state` (megatron-core's own
  offload_grad_buffers / offload_to_cpu) with the paper's flags (bf16, distributed optimizer) under CUDA
  emulation: the memory really leaves the device, the round trip is bitwise, the next step is identical.
- vLLM side: the sleep / wake plan (`VllmMemory`) replayed through vLLM's own executor bookkeeping
  (v1/executor/abstract.py Executor.sleep / wake_up), which silently drops calls it does not accept.
- The NaN guard's chunked reduction: exact, and no temporary larger than a chunk.
"""

from __future__ import annotations

import logging

from pathlib import Path

import pytest
import torch

from megatron_a3po.spawn import run_in_ranks

# ---- Megatron: offload -> restore round trip ------------------------------------------------------------------


def _inner_optimizers(model):
    return list(getattr(model.optimizer, "chained_optimizers", [model.optimizer]))


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Weights (by HF name), every grad buffer, and every optimizer tensor (main params, Adam moments), on host."""
    out = {f"weight/{name}": t.detach().cpu().clone() for name, t in model.hf_state()}
    for c, chunk in enumerate(model.chunks):
        for b, buffer in enumerate(chunk.buffers):
            out[f"grad/{c}.{b}"] = buffer.grad_data.detach().cpu().clone()
    for k, inner in enumerate(_inner_optimizers(model)):
        for g, group in enumerate(inner.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                out[f"opt/{k}.{g}.{i}.param"] = p.detach().cpu().clone()
                for name, value in inner.optimizer.state[p].items():
                    if isinstance(value, torch.Tensor):
                        out[f"opt/{k}.{g}.{i}.{name}"] = value.detach().cpu().clone()
    return out


def _train_step(model, tokens):
    from megatron.core import tensor_parallel

    total = tokens[:, 1:].numel()

    def loss_fn(logits, batch):
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                                 batch["labels"].t().contiguous())
        return per_token.sum() / total, {}

    model.forward_backward([{"tokens": mb[:, :-1], "labels": mb[:, 1:]} for mb in tokens.split(2)], loss_fn)
    return model.optimizer_step()


def _round_trip(hf_dir):
    """Two identical policies (bf16, distributed optimizer) take step 1; one offloads and restores its training
    state in between (as a rollout would), then both take step 2."""
    from megatron_a3po import parallel, platform
    from megatron_a3po.config import Config
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models.families import load_hf_arch

    arch, _ = load_hf_arch(hf_dir)
    cfg = Config()
    cfg.model.bf16, cfg.training.use_distributed_optimizer = True, True
    cfg.training.lr = cfg.training.min_lr = 1e-3
    parallel.init_model_parallel(parallel.ParallelSizes(), seed=0)
    models = []
    for _ in range(2):
        model = PolicyModel(cfg, arch)
        model.load_hf(hf_dir)
        models.append(model)
    plain, offloaded = models
    tokens = torch.randint(1, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(5))
    loaded = {name: t.float().clone() for name, t in plain.hf_state()}
    # rl_job's --load of a converted checkpoint: load_model, then weights_loaded (the same fp32 main-param bug)
    from megatron_a3po.models.megatron_ckpt import load_model, save_model

    ckpt = Path(hf_dir).parent / "converted"
    ckpt.mkdir()
    save_model(plain.chunks, ckpt)
    from_ckpt = PolicyModel(cfg, arch)
    load_model(from_ckpt.chunks, ckpt)
    from_ckpt.weights_loaded()
    for model in [*models, from_ckpt]:
        assert _train_step(model, tokens)["update_successful"]
    drift = max((t.float() - loaded[name]).abs().max().item() for name, t in plain.hf_state())
    drift_ckpt = max((t.float() - loaded[name]).abs().max().item() for name, t in from_ckpt.hf_state())
    before = _snapshot(offloaded)
    p1 = _snapshot(plain)
    step1_differs = [name for name in p1 if not torch.equal(p1[name], before[name])]

    offloaded.offload_train_state()
    grad_sizes = [buffer.grad_data.untyped_storage().size() for chunk in offloaded.chunks for buffer in chunk.buffers]
    opt_tensors = [t for inner in _inner_optimizers(offloaded) for group in inner.optimizer.param_groups
                   for p in group["params"] for t in [p, *[v for v in inner.optimizer.state[p].values()
                                                           if isinstance(v, torch.Tensor) and v.dim() > 0]]]
    released = {
        "grad_storage_bytes": grad_sizes,  # megatron-core resizes each grad buffer's storage to 0
        "opt_tensors": len(opt_tensors),
        "opt_on_device": sum(platform.on_device(t) for t in opt_tensors),
        "weights_on_device": all(platform.on_device(p) for chunk in offloaded.chunks for p in chunk.parameters()),
    }
    offloaded.offload_train_state()  # idempotent
    offloaded.restore_train_state()
    offloaded.restore_train_state()  # idempotent
    restored = {"opt_on_device": all(platform.on_device(t) for inner in _inner_optimizers(offloaded)
                                     for group in inner.optimizer.param_groups for p in group["params"]
                                     for t in [p, *inner.optimizer.state[p].values()] if
                                     isinstance(t, torch.Tensor) and t.dim() > 0)}
    after = _snapshot(offloaded)
    differs = [name for name in before if not (name.startswith("grad/") or torch.equal(before[name], after[name]))]
    grads_zero = all(not after[name].any() for name in after if name.startswith("grad/"))
    stats2 = [_train_step(model, tokens) for model in models]
    assert all(stats["update_successful"] for stats in stats2)
    a, b = _snapshot(plain), _snapshot(offloaded)
    step2_differs = [name for name in a if not torch.equal(a[name], b[name])]
    return dict(released=released, restored=restored, differs=differs, grads_zero=grads_zero, names=sorted(before),
                step2_differs=step2_differs, step1_differs=step1_differs, stats2=stats2, drift=drift, drift_ckpt=drift_ckpt, dtype=str(offloaded.dtype), emulating=platform.emulating())


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    hf_dir = str(write_tiny_hf_checkpoint(tmp_path_factory.mktemp("handoff") / "m", "qwen2", seed=2))
    (result,) = run_in_ranks(_round_trip, 1, (hf_dir,), env={"A3PO_EMULATE_CUDA": "1", "A3PO_PROGRESS": "0"})
    return result


def test_first_step_starts_from_the_loaded_weights_under_bf16(round_trip):
    """The fp32 main params of the bf16 optimizer follow load_hf (PolicyModel.weights_loaded): one Adam step at
    lr 1e-3 moves each weight by about lr (plus bf16 rounding), not back to the random initialisation."""
    assert round_trip["drift"] < 0.02, round_trip["drift"]
    assert round_trip["drift_ckpt"] < 0.02, round_trip["drift_ckpt"]  # --load of a converted checkpoint


def test_offload_releases_grad_buffers_and_optimizer_state_from_the_device(round_trip):
    assert round_trip["emulating"] and round_trip["dtype"] == "torch.bfloat16"
    released = round_trip["released"]
    assert released["grad_storage_bytes"] and all(size == 0 for size in released["grad_storage_bytes"])
    assert released["opt_tensors"] >= 3 and released["opt_on_device"] == 0  # main params, exp_avg, exp_avg_sq
    assert released["weights_on_device"]  # the bf16 weights stay: refit and old log-probs read them
    assert round_trip["restored"]["opt_on_device"]


def test_offload_restore_round_trip_is_bitwise_and_the_next_step_identical(round_trip):
    names = round_trip["names"]
    assert any(n.startswith("weight/") for n in names) and any(n.endswith("exp_avg_sq") for n in names)
    assert round_trip["differs"] == []  # weights, fp32 main params and Adam moments bitwise
    assert round_trip["grads_zero"]  # megatron-core's restore_grad_buffers zeroes, as zero_grad_buffer would
    assert round_trip["step1_differs"] == [], round_trip["step1_differs"][:5]
    assert round_trip["step2_differs"] == [], (round_trip["stats2"], round_trip["step2_differs"][:5])  # weights, grads and optimizer state after step 2, bitwise


def test_offload_flag_needs_mixed_precision():
    from megatron_a3po import config as C

    cfg, _ = C.parse_args(["--tiny-model", "qwen2", "--offload-train-during-rollout"])
    with pytest.raises(C.ConfigError, match="--offload-train-during-rollout needs --bf16"):
        C.validate(cfg, world_size=1)
    cfg, _ = C.parse_args(["--tiny-model", "qwen2", "--offload-train-during-rollout", "--bf16"])
    C.validate(cfg, world_size=1)
    assert cfg.training.offload_train_during_rollout


def test_paper_configs_offload_training_state_during_rollout():
    from helpers import PAPER_FAMILIES, REPO

    from megatron_a3po import config as C

    for name in PAPER_FAMILIES:
        cfg, _ = C.parse_args(["--config", str(REPO / "configs" / name)])
        assert cfg.training.offload_train_during_rollout and cfg.model.bf16, name


# ---- vLLM: the sleep / wake plan against vLLM's executor ---------------------------------------------------------


class _VllmExecutorBookkeeping:
    """vLLM's own Executor.sleep / wake_up / is_sleeping (the functions themselves, not copies) over a worker
    that records what it is asked, as the real executor's collective_rpc would forward it to every GPU worker."""

    from vllm.v1.executor.abstract import Executor as _Executor

    sleep = _Executor.sleep
    wake_up = _Executor.wake_up
    is_sleeping = _Executor.is_sleeping

    def __init__(self):
        self.sleeping_tags: set[str] = set()
        self.worker_calls: list[tuple[str, dict]] = []

    def collective_rpc(self, method, kwargs=None, **_):
        self.worker_calls.append((method, dict(kwargs or {})))


def _replay(memory, phases):
    """Run `phases` (names of VllmMemory steps) through vLLM's executor; returns per phase the worker calls, the
    tags asleep afterwards, and vLLM's warnings (each one a call vLLM dropped)."""
    executor = _VllmExecutorBookkeeping()
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logger = logging.getLogger("vllm.v1.executor.abstract")
    handler = Catch()
    logger.addHandler(handler)
    trace = []
    try:
        for phase in phases:
            first = len(executor.worker_calls)
            if phase == "refit":
                calls = memory.before_refit()
                memory.refitted()
            elif phase == "generate":
                calls = memory.before_generate()
            else:
                calls = memory.sleep(keep_weights=phase == "sleep_keep")
            for method, kwargs in calls:
                getattr(executor, method)(**kwargs)
            trace.append((phase, executor.worker_calls[first:], set(executor.sleeping_tags)))
    finally:
        logger.removeHandler(handler)
    return trace, warnings


def test_one_rl_step_sleeps_at_level_2_and_wakes_weights_then_kv_cache():
    from megatron_a3po.rollout.engine import VllmMemory

    # fit(): refit, evaluate; step: generate, sleep, (train), refit; evaluate with the offload; next step
    trace, warnings = _replay(VllmMemory(), ["refit", "generate", "sleep", "refit", "generate", "sleep_keep",
                                             "generate", "sleep", "sleep", "refit", "generate"])
    assert warnings == []  # vLLM accepted every call (it drops the ones it does not, with a warning)
    calls = [(phase, worker_calls) for phase, worker_calls, _ in trace]
    assert calls == [
        ("refit", []), ("generate", []),  # the engine starts awake
        ("sleep", [("sleep", {"level": 2})]),  # weights and KV cache discarded, nothing copied to host
        ("refit", [("wake_up", {"tags": ["weights"]})]),  # weights only: the worker restores its buffers here
        ("generate", [("wake_up", {"tags": ["kv_cache"]})]),
        ("sleep_keep", [("sleep", {"level": 1})]),  # no refit before the next generation: weights kept on host
        ("generate", [("wake_up", {"tags": None})]),
        ("sleep", [("sleep", {"level": 2})]), ("sleep", []),  # a second sleep would be dropped by vLLM
        ("refit", [("wake_up", {"tags": ["weights"]})]), ("generate", [("wake_up", {"tags": ["kv_cache"]})]),
    ]
    asleep = {i: tags for i, (_, _, tags) in enumerate(trace)}
    assert asleep[3] == {"kv_cache"}  # refit runs without the KV cache resident
    # Generation only when nothing is asleep: EngineCore.wake_up resumes the scheduler only then.
    assert all(tags == set() for phase, _, tags in trace if phase == "generate")


def test_generating_after_a_level_2_sleep_without_refit_is_refused():
    from megatron_a3po.rollout.engine import VllmMemory

    memory = VllmMemory()
    memory.sleep()
    with pytest.raises(RuntimeError, match="refit"):
        memory.before_generate()
    memory.before_refit()
    memory.refitted()
    assert memory.before_generate() == [("wake_up", {"tags": ["kv_cache"]})]


class _PlanEngine:
    """RolloutEngine's memory plan (the real VllmMemory) without vLLM: generate() refuses what the GPU would."""

    def __init__(self):
        from megatron_a3po.rollout.engine import VllmMemory

        self.memory, self.calls = VllmMemory(), []

    def sleep(self, keep_weights: bool = False):
        self.calls += self.memory.sleep(keep_weights)

    def generate(self):
        self.calls += self.memory.before_generate()


class _RecordingPolicy:
    def __init__(self):
        self.calls = []

    def offload_train_state(self):
        self.calls.append("offload")

    def restore_train_state(self):
        self.calls.append("restore")


@pytest.mark.parametrize("offload", [False, True])
def test_a_step_with_nothing_to_train_keeps_vllm_weights_for_the_next_rollout(offload):
    """Dynamic sampling can keep no group: RLTrainer.step returns before training, so no refit follows, and the
    next step generates with the weights vLLM had: its sleep must keep them (level 1), not discard them."""
    from megatron_a3po.trainer import RLTrainer

    class Trainer:  # RLTrainer's own step and memory methods; the rollout yields nothing to train on
        step, to_rollout, to_training = RLTrainer.step, RLTrainer.to_rollout, RLTrainer.to_training

        def collect_rollouts(self, step, timer):
            self.engine.generate()
            return None, None, {"dynamic/trained_prompts": 0.0}

    trainer = Trainer()
    trainer.engine, trainer.policy, trainer.offload_train = _PlanEngine(), _RecordingPolicy(), offload
    metrics = trainer.step(1)
    assert metrics["train/skipped_updates"] == 0 and metrics["dynamic/trained_prompts"] == 0
    trainer.step(2)  # generates without a refit in between
    assert trainer.engine.calls == [("sleep", {"level": 1}), ("wake_up", {"tags": None}), ("sleep", {"level": 1})]
    assert trainer.policy.calls == (["offload", "restore"] * 2 if offload else [])


def test_vllm_refuses_sleep_mode_on_cpu_so_the_engine_enables_it_on_gpu_only():
    """vllm/config/model.py ModelConfig.__post_init__: enable_sleep_mode needs
    current_platform.is_sleep_mode_available() (CUDA, ROCm, XPU), else ValueError. engine_kwargs asks for sleep
    mode exactly where that holds."""
    from vllm.platforms import current_platform

    from megatron_a3po.rollout.engine import engine_kwargs

    kwargs = dict(rollout_tp=1, max_model_len=64, seed=0, dtype="float32", load_format="dummy",
                  gpu_memory_utilization=0.5)
    assert not current_platform.is_sleep_mode_available()
    assert engine_kwargs("m", on_gpu=False, **kwargs)["enable_sleep_mode"] is False
    assert engine_kwargs("m", on_gpu=True, **kwargs)["enable_sleep_mode"] is True


# ---- NaN guard: a chunked reduction -----------------------------------------------------------------------------


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op produces (bytes): what the reduction allocates besides its 1-element flag."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_flag_finds_one_bad_gradient_anywhere_with_chunk_sized_temporaries(bad_value):
    from megatron_a3po.guards import nonfinite_flag

    chunk = 1000
    buffers = [torch.zeros(10_007), torch.full((4_500,), 3e38)]  # huge finite values: a sum would overflow
    assert nonfinite_flag(buffers, chunk=chunk).item() == 0.0
    for b, index in [(0, 0), (0, 9_999), (0, 10_006), (1, 2_345), (1, 4_499)]:
        buffers[b][index] = bad_value
        mode = _LargestAllocation()
        mode.inputs = {t.untyped_storage().data_ptr() for t in buffers}
        with mode:
            flag = nonfinite_flag(buffers, chunk=chunk)
        assert flag.item() == 1.0, (b, index)
        # isfinite's abs() is the largest temporary: one slice of the buffer's dtype, never the whole buffer
        assert 0 < mode.largest <= chunk * buffers[b].element_size(), mode.largest
        buffers[b][index] = 0.0
