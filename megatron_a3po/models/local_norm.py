"""RMSNorm for megatron-core's local (non-Transformer-Engine) layer spec that allows sequence parallelism.

megatron-core's `WrappedTorchNorm` refuses `sequence_parallel` although a norm is elementwise over the hidden
dimension and works on a sequence shard as well as on the whole sequence. What sequence parallelism needs is
what Transformer Engine's norm does: mark the weight `sequence_parallel`, so `finalize_model_grads` sums its
gradient (computed from this rank's tokens only) across the TP group. Without sequence parallelism it is
exactly `torch.nn.RMSNorm`.
"""

from __future__ import annotations

import dataclasses

import torch


class LocalRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm builds RMSNorm only, not {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def with_local_norms(spec):
    """The spec with every megatron `WrappedTorchNorm` replaced by LocalRMSNorm (recursively)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return LocalRMSNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=with_local_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: with_local_norms(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    return spec
