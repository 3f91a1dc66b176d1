"""RMSNorm for megatron-core's local (non-Transformer-Engine) layer spec that allows sequence parallelism.

megatron-core's `WrappedTorchNorm` refuses `sequence_parallel` although a norm is elementwise over the hidden
dimension and works on a sequence shard as well as on the whole sequence. What sequence parallelism needs is
what Transformer Engine's norm does: mark the weight `sequence_parallel`, so `finalize_model_grads` sums its
gradient (computed from this rank's tokens only) across the TP group. Without sequence parallelism it is
exactly `torch.nn.RMSNorm`.
"""

from __future__ import annotations

import torch


class LocalRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm builds RMSNorm only, not {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
