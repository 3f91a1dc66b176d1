"""Run megatron-core on CPU when CUDA is absent; do nothing when CUDA is present.

megatron-core assumes a GPU in a handful of places. On a CUDA machine none of this is applied.
Without CUDA, `enable_cpu_compat()` (idempotent, called by `parallel.init_distributed`) handles:

1. Device redirection (a `TorchFunctionMode`): tensors asked for on "cuda" / device index 0 are made on
   CPU. Needed by `device="cuda"` allocations in `pipeline_parallel/schedules.py` (total_num_tokens),
   `optimizer/clip_grads.py` (total norm, overflow buffer), `.cuda()` calls, and every
   `device=torch.cuda.current_device()` (rotary embedding `inv_freq.to(...)`, p2p shape buffers, DDP
   grad buffers). `torch.cuda.current_device()` itself returns 0, which the mode maps to CPU.
2. CUDA tensor type names: `Tensor.type()` reports "torch.cuda.FloatTensor" for CPU float32 (etc.).
   Needed by the assertion in `clip_grad_by_total_norm_fp32` (clip_grad > 0) and the dtype dispatch in
   `optimizer.Float16OptimizerWithFloat16Params` / `distrib_optimizer` that compare type strings.
3. A CPU RNG tracker in place of `tensor_parallel.random`'s CUDA one, so `get_cuda_rng_tracker().fork()`
   (attention dropout, TP weight init) and `model_parallel_cuda_manual_seed` work; recompute's
   `_get_cuda_rng_state/_set_cuda_rng_state` use the CPU generator.
4. Streams, events and synchronize become no-ops: `torch.cuda.synchronize()` in
   `p2p_communication`, `current_stream()/Stream/stream()/Event` in the DDP grad buffer
   (`param_and_grad_buffer.py`) and the overlap paths of the optimizer.

With `A3PO_EMULATE_CUDA=1` it also switches on CUDA emulation (`cuda_emulation.py`): device tensors are told
apart from host tensors and the GPU's device and NCCL rules raise on CPU, so the code path users take on GPUs
runs here. `device()` then answers "cuda:0".
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode

from megatron_a3po.backward_mode import BACKWARD_ENTRIES, run_backward_in_mode

_APPLIED = False
_EMULATING = False

# CPU type name -> the CUDA name megatron-core compares against.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def cuda_available() -> bool:
    return torch.cuda.is_available()


EMULATE_ENV = "A3PO_EMULATE_CUDA"


def emulation_requested() -> bool:
    return os.environ.get(EMULATE_ENV, "0") == "1" and not cuda_available()


def emulating() -> bool:
    """True once CUDA emulation is in force in this process."""
    return _EMULATING


def device() -> torch.device:
    """The device tensors of this process live on."""
    if cuda_available() or _EMULATING:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def host_syncs() -> int | None:
    """Device-to-host syncs counted so far (CUDA emulation only; None otherwise)."""
    if not _EMULATING:
        return None
    from megatron_a3po import cuda_emulation

    return cuda_emulation.host_syncs()


def host_region():
    """Context for code that computes with plain CPU tensors (vLLM's CPU engine): no device checks inside."""
    if not _EMULATING:
        return contextlib.nullcontext()
    from megatron_a3po import cuda_emulation

    return cuda_emulation.host_region()


def emulated_host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` as a host tensor for a CPU-only consumer under emulation (vLLM's CPU engine at refit); `t` itself
    otherwise. Not counted as a host sync: on a GPU machine that consumer is on the GPU too."""
    if not _EMULATING:
        return t
    from megatron_a3po import cuda_emulation

    return cuda_emulation.host_copy(t)


def on_device(t: torch.Tensor) -> bool:
    """Whether `t` lives on the accelerator (emulated or real)."""
    if _EMULATING:
        from megatron_a3po import cuda_emulation

        return cuda_emulation.on_device(t)
    return t.is_cuda


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device arguments that name CUDA to CPU (see module docstring, item 1 and 2)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BACKWARD_ENTRIES:
            return run_backward_in_mode(self, func, args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self):
        return True


@contextlib.contextmanager
def _no_op_stream_context(stream=None):
    yield


class CpuRNGStatesTracker:
    """CPU twin of megatron's CudaRNGStatesTracker: named RNG states swapped into torch's CPU generator."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def enable_cpu_compat() -> bool:
    """Apply the CPU patches if CUDA is absent (and CUDA emulation if asked for). True when they are in force."""
    global _APPLIED, _EMULATING
    if cuda_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mc_random

    # 1 + 2: device redirection and CUDA type names.
    _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process
    torch.cuda.current_device = lambda: 0

    # 3: RNG.
    mc_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mc_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None  # model_parallel_cuda_manual_seed seeds the tracker instead

    # 4: streams, events, synchronize.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = functools.partial(_NoOpStream)
    torch.cuda.default_stream = functools.partial(_NoOpStream)
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.stream = _no_op_stream_context
    torch.cuda.empty_cache = lambda: None
    _APPLIED = True
    if emulation_requested():
        from megatron_a3po import cuda_emulation

        cuda_emulation.enable()
        _EMULATING = True
    return True
