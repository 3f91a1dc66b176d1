"""CUDA emulation on CPU: enforce the GPU's device and NCCL rules where no GPU exists.

On when `A3PO_EMULATE_CUDA=1` and CUDA is absent (switched on by `platform.enable_cpu_compat()`, i.e. by
`parallel.init_distributed()`); nothing here is imported or costs anything otherwise. Every tensor still
computes on CPU; what changes is which tensors count as "on the device":

- Tensors put there by our code or megatron-core (`device="cuda"`, `.cuda()`, `.to(platform.device())`,
  `torch.cuda.current_device()`, hence parameters and DDP grad buffers) are recorded by their *storage*, so
  views, `.data`, `param.data = ...` and everything computed from them (forward and autograd's backward, seen
  by a `TorchDispatchMode`) are device tensors too. Their `.device` reports `cuda:0`, so
  `torch.empty(n, device=x.device)` lands on the device as it would on a GPU.
- An op mixing a device tensor with a host tensor of one or more dimensions raises `DeviceMismatchError`
  (0-dim host tensors mix, as CUDA allows; copies across devices are allowed; index tensors may be host).
- A collective on a group that would be NCCL on a GPU (the default group and `new_group` without a backend
  or with "nccl") raises `NcclHostTensorError` on a host tensor. Explicit gloo groups take host tensors; the
  object collectives (`all_gather_object`, ...) are exempt, as NCCL moves their bytes itself.
- Device-to-host syncs (`.item()`, `.tolist()`, `.cpu()`, `bool()`, `float()`, ... of a device tensor) are
  counted (`host_syncs()`); `.numpy()` of a device tensor raises, as on CUDA.
- `host_region()` suspends the op checks (vLLM's CPU engine computes with plain CPU tensors there).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from megatron_a3po.backward_mode import BACKWARD_ENTRIES, run_backward_in_mode

DEVICE = torch.device("cuda", 0)
aten = torch.ops.aten

_device_storages: "weakref.WeakSet" = weakref.WeakSet()
_nccl_groups: dict[int, object] = {}  # id -> group (strong ref: ProcessGroup is not weak-referenceable)
_syncs = 0
_collective_depth = 0  # > 0 inside an object collective, whose tensors torch places itself
_ACTIVE = False


class DeviceMismatchError(RuntimeError):
    """An op mixed device and host tensors: CUDA would raise here."""


class NcclHostTensorError(RuntimeError):
    """A host tensor reached a collective on a group that is NCCL on a GPU."""


def active() -> bool:
    return _ACTIVE


def on_device(t: torch.Tensor) -> bool:
    try:
        return t.untyped_storage() in _device_storages
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return False


def _tag(out):
    for t in _tensors(out):
        try:
            _device_storages.add(t.untyped_storage())
        except (RuntimeError, NotImplementedError):
            pass
    return out


def _untag(t: torch.Tensor) -> torch.Tensor:
    _device_storages.discard(t.untyped_storage())
    return t


def host_syncs() -> int:
    """Device-to-host syncs so far in this process."""
    return _syncs


def _count_sync() -> None:
    global _syncs
    _syncs += 1


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _describe(t: torch.Tensor) -> str:
    return f"{'cuda' if on_device(t) else 'cpu'} {t.dtype} {tuple(t.shape)}"


# ---- ops: mixing rule and propagation ---------------------------------------------------------------------------

_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten.copy.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default}
_HOST_INDICES = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                 aten._index_put_impl_.default}


class _DeviceOps(TorchDispatchMode):
    """Sees every aten op (autograd's backward included): raises on device/host mixing, tags outputs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        checked = (args[0], *args[2:]) if func in _HOST_INDICES else args
        tensors = list(_tensors(checked)) + list(_tensors(kwargs))
        device_inputs = [t for t in tensors if on_device(t)]
        if device_inputs and func not in _CROSS_DEVICE:
            host = [t for t in tensors if t.dim() > 0 and not on_device(t)]
            if host:
                raise DeviceMismatchError(
                    f"{func} mixes device and host tensors: {', '.join(_describe(t) for t in tensors)}. "
                    "CUDA raises 'Expected all tensors to be on the same device' here; move the host tensor "
                    "to platform.device() where the data enters (only 0-dim host scalars mix)")
        if func is aten.copy_.default and device_inputs and not on_device(args[0]):
            _count_sync()  # a device-to-host copy waits for the stream
        out = func(*args, **kwargs)
        if device_inputs and not func._schema.is_mutable:
            _tag(out)
        return out


_DEVICE_GETTER = torch._C.TensorBase.__dict__["device"]  # Tensor.device's descriptor (func.__self__ of its getter)
_IS_CUDA_GETTER = torch._C.TensorBase.__dict__["is_cuda"]
_SYNC_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                 torch.Tensor.__int__, torch.Tensor.__index__}


def _wants_cuda(dev) -> bool | None:
    """True for a CUDA device spec, False for another device, None when no device was named."""
    if dev is None:
        return None
    if isinstance(dev, torch.Tensor):
        return on_device(dev)
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


def _to_device_argument(args, kwargs):
    """The device named by a `Tensor.to(...)` call (a tensor for `.to(other)`), or None."""
    if "device" in kwargs:
        return kwargs["device"]
    first = args[1] if len(args) > 1 else None
    if isinstance(first, (str, torch.device, torch.Tensor)) or (isinstance(first, int) and not isinstance(first, bool)):
        return first
    return None


def _place(out, inputs, to_device: bool):
    """Give `out` a storage of its own on the requested side (a copy, as a real transfer makes)."""
    if not isinstance(out, torch.Tensor):
        return out
    sources = {t.untyped_storage() for t in inputs if isinstance(t, torch.Tensor)}
    if out.untyped_storage() in sources and on_device(out) != to_device:
        with _disable_current_modes():
            out = out.clone()
    return _tag(out) if to_device else _untag(out)


class _DeviceFunctions(TorchFunctionMode):
    """Sits above platform's cuda->cpu redirection: decides which results live on the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BACKWARD_ENTRIES:
            return run_backward_in_mode(self, func, args, kwargs)
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_GETTER or owner is _IS_CUDA_GETTER:
            if on_device(args[0]):
                return DEVICE if owner is _DEVICE_GETTER else True
            return func(*args, **kwargs)
        if func in _SYNC_METHODS:
            if on_device(args[0]):
                _count_sync()
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy and on_device(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first (CUDA emulation)")
        if func is torch.Tensor.cuda:
            return _place(args[0], [args[0]], True)
        if func is torch.Tensor.cpu:
            if on_device(args[0]):
                _count_sync()
            return _place(args[0], [args[0]], False)
        if func is torch.Tensor.to:
            dev = _to_device_argument(args, kwargs)
            want = _wants_cuda(dev)
            if want is None:
                return func(*args, **kwargs)
            if not want and on_device(args[0]):
                _count_sync()
            return _place(func(*args, **kwargs), [args[0]], want)
        want = _wants_cuda(kwargs.get("device"))
        out = func(*args, **kwargs)
        if want is not None and isinstance(out, torch.Tensor):
            out = _place(out, list(_tensors(args)), want)
        return out


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor (no sync counted: see platform.emulated_host_copy); host tensors as they are."""
    return _place(t, [t], False) if on_device(t) else t


@contextlib.contextmanager
def host_region():
    """Run plain CPU code (vLLM's CPU engine) without the op checks."""
    with _disable_current_modes():
        yield


# ---- collectives --------------------------------------------------------------------------------------------------

_TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                       "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
                       "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter")
_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                       "send_object_list", "recv_object_list")


def _nccl_on_gpu(group) -> bool:
    return group is None or group is dist.GroupMember.WORLD or id(group) in _nccl_groups


def _check_host_tensors(name: str, pairs) -> None:
    for group, tensors in pairs:
        if not _nccl_on_gpu(group):
            continue
        for t in tensors:
            if not on_device(t):
                raise NcclHostTensorError(
                    f"would fail under NCCL: host tensor in {name} ({_describe(t)}) on a group that is NCCL on a "
                    "GPU ('No backend type associated with device type cpu'). Create the tensor on "
                    "platform.device(), or use an explicit gloo group for host metadata")


def _wrap_tensor_collective(name: str, orig):
    signature = inspect.signature(orig)

    @functools.wraps(orig)
    def checked(*args, **kwargs):
        if _collective_depth == 0:
            bound = signature.bind(*args, **kwargs).arguments
            if name == "batch_isend_irecv":
                pairs = [(op.group, [op.tensor]) for op in bound["p2p_op_list"]]
            else:
                tensors = [v for k, v in bound.items() if k != "group" for v in _tensors(v)]
                pairs = [(bound.get("group"), tensors)]
            _check_host_tensors(name, pairs)
        return orig(*args, **kwargs)
    return checked


def _wrap_object_collective(orig):
    @functools.wraps(orig)
    def exempt(*args, **kwargs):
        global _collective_depth
        _collective_depth += 1
        try:
            return orig(*args, **kwargs)
        finally:
            _collective_depth -= 1
    return exempt


def _wrap_new_group(orig):
    signature = inspect.signature(orig)

    @functools.wraps(orig)
    def recording(*args, **kwargs):
        group = orig(*args, **kwargs)
        backend = signature.bind(*args, **kwargs).arguments.get("backend")
        if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER and (
                backend is None or "nccl" in str(backend).lower()):
            _nccl_groups[id(group)] = group
        return group
    return recording


def _patch_distributed() -> None:
    from torch.distributed import distributed_c10d as c10d

    for name in (*_TENSOR_COLLECTIVES, "batch_isend_irecv"):
        wrapped = _wrap_tensor_collective(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    for name in _OBJECT_COLLECTIVES:
        wrapped = _wrap_object_collective(getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    wrapped = _wrap_new_group(c10d.new_group)
    c10d.new_group = dist.new_group = wrapped


def enable() -> None:
    """Switch emulation on for the rest of the process (idempotent). Call after platform's CPU redirection."""
    global _ACTIVE
    if _ACTIVE:
        return
    _patch_distributed()
    _DeviceFunctions().__enter__()  # above platform's redirection mode: sees the caller's device arguments
    _DeviceOps().__enter__()
    _ACTIVE = True
