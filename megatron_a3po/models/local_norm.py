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
        # The weight in params_dtype, as Transformer Engine's norm keeps it (torch's default would be fp32): under
        # bf16 a fp32 norm among bf16 params breaks megatron-core's distributed optimizer, whose groups list fp32
        # params first (_build_model_and_main_param_groups) while model_param_group_index_map keeps buffer order,
        # so its checkpoint pairs model params with other params' main params (tests/test_gpu_smoke.py).
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
