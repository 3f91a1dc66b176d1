"""Running autograd's backward pass under a TorchFunctionMode (used by platform's CPU redirection and by
cuda_emulation, which sits above it): a leaf both import, so neither imports the other for it."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

BACKWARD_ENTRIES = (torch.autograd.backward, torch.Tensor.backward)


def run_backward_in_mode(mode: TorchFunctionMode, func, args, kwargs):
    """Run `torch.autograd.backward` / `Tensor.backward` with `mode` still active.

    A mode's handler runs with the mode popped, so calling `func` would run the whole backward pass (megatron's
    custom autograd functions allocate with device=torch.cuda.current_device() there) without it. This calls the
    autograd engine directly instead, with the mode pushed back.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("gradient", "retain_graph", "create_graph", "inputs")
        options = dict(zip(names, args[1:]), **kwargs)
        options["grad_tensors"] = options.pop("gradient", None)
        tensors = (args[0],)
    else:
        names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        options = dict(zip(names, args[1:]), **kwargs)
        tensors = (args[0],) if isinstance(args[0], torch.Tensor) else tuple(args[0])
    if options.get("grad_variables") is not None or options.get("inputs"):
        raise NotImplementedError("backward(inputs=/grad_variables=) under the CPU compatibility mode")
    create_graph = bool(options.get("create_graph", False))
    retain_graph = options.get("retain_graph")
    with mode:
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(options.get("grad_tensors"), len(tensors)),
                            is_grads_batched=False)
        _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
                             (), allow_unreachable=True, accumulate_grad=True)
