"""Quiets vLLM's per-refit "<Layer>: Failed to load weights" warning for layers that no checkpoint fills.

vLLM's layerwise reload warns for every layer that holds tensors but received none. Two kinds of layer always do
so, on every refit, while nothing is wrong: rotary embeddings (their cos/sin cache is computed, never loaded) and
a tied LM head (the embedding loads the shared weight). The same warning for any other layer stays visible.
"""

from __future__ import annotations

import logging

import torch

LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # the logger that emits the warning
FAILED_TO_LOAD = "%s: Failed to load weights"


def nothing_to_load(model: torch.nn.Module) -> set[str]:
    """Class names of the layers of `model` that a checkpoint never fills: each of their own tensors is either a
    non-persistent buffer (absent from checkpoints by definition) or a parameter that an earlier layer also holds
    and loads (named_parameters' dedup order, which is the name vLLM loads a tied tensor under). The warning names
    only the class, so a class with any instance that does load something is left out."""
    owner: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owner.setdefault(id(p), module)
    quiet, loud = set(), set()
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        buffers = {name for name, b in module._buffers.items() if b is not None}
        if not params and not buffers:
            continue  # nothing to load, and vLLM does not warn for it
        aliased = all(owner[id(p)] is not module for p in params)
        computed = buffers <= module._non_persistent_buffers_set
        (quiet if aliased and computed else loud).add(type(module).__name__)
    return quiet - loud


class ReloadWarningFilter(logging.Filter):
    """Drops exactly the WARNING "<cls>: Failed to load weights" for the given classes; passes every other record."""

    def __init__(self, quiet: set[str]):
        super().__init__()
        self.quiet = frozenset(quiet)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.levelno == logging.WARNING and record.msg == FAILED_TO_LOAD and len(args) == 1
                    and args[0] in self.quiet)


def install(quiet: set[str]) -> ReloadWarningFilter:
    """On the emitting logger itself: a logger's filters see its own records, wherever they propagate to."""
    f = ReloadWarningFilter(quiet)
    logging.getLogger(LAYERWISE_LOGGER).addFilter(f)
    return f


def uninstall(f: ReloadWarningFilter) -> None:
    logging.getLogger(LAYERWISE_LOGGER).removeFilter(f)
