"""Core attention for megatron-core's local (non-Transformer-Engine) layer spec that also takes packed sequences.

megatron-core's local `DotProductAttention` refuses `packed_seq_params`; Transformer Engine's attention takes
the `thd` format on CUDA. This module is the local spec's equivalent: for a pack of sequences laid back to
back ([t, heads, head_dim], boundaries in `cu_seqlens`), each sequence attends causally to itself only, as
if it were its own row of a padded batch. Without packing it is megatron's module unchanged.

Context parallelism is not implemented here (the job refuses packing with CP > 1 on the local spec).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


class LocalDotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention expects qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
        if attention_bias is not None:
            raise ValueError("attention bias is not supported by the local attention")
        cu_seqlens = packed_seq_params.cu_seqlens_q_padded
        if cu_seqlens is None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        # query [t, np, hn]; key/value [t, ng, hn] (grouped-query attention: ng divides np)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if sum(lengths) != query.shape[0]:
            raise ValueError(f"cu_seqlens cover {sum(lengths)} tokens but the pack has {query.shape[0]}")
        # megatron divides softmax_scale by the layer number under query-key layer scaling and multiplies back
        # inside its softmax; here the softmax takes the plain scale.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        outputs = []
        for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths)):
            # [L, h, d] -> [h, L, d]; scores and softmax in fp32, as megatron's unfused path does
            # (attention_softmax_in_fp32). The causal mask is made where q lives (the device).
            q, k, v = (x.transpose(0, 1).float() for x in (q, k, v))
            scores = torch.matmul(q, k.transpose(1, 2)) * scale
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=query.device).tril()
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            outputs.append(torch.matmul(probs, v).transpose(0, 1).to(query.dtype))
        return torch.cat(outputs)  # [t, np, hn]: megatron's Attention reshapes it to [t, 1, np * hn]
