"""ModelArch + run config -> TransformerConfig, layer spec and the GPTModel chunk(s) of this PP stage."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys

import torch
import torch.nn.functional as F

from megatron_a3po import parallel, platform
from megatron_a3po.models.families import ModelArch
from megatron_a3po.models.local_norm import LocalRMSNorm

@functools.cache
def transformer_engine_usable() -> bool:
    """TE needs both its torch extension and a CUDA device; either missing means the local spec."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing .so, ABI) means TE is unusable
        return False
    return True


def use_transformer_engine(transformer_impl: str = "auto") -> bool:
    if transformer_impl == "local":
        return False
    if transformer_impl == "transformer_engine":
        if not transformer_engine_usable():
            raise RuntimeError("--transformer-impl transformer_engine needs Transformer Engine and CUDA")
        return True
    return transformer_engine_usable()


def layer_spec(arch: ModelArch, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_a3po.models.local_attention import LocalDotProductAttention

    # megatron's local norm refuses sequence parallelism and its local attention refuses packed sequences
    return _replace_modules(specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm"),
                            {WrappedTorchNorm: LocalRMSNorm, DotProductAttention: LocalDotProductAttention})


def _replace_modules(spec, replacements: dict):
    """The layer spec with each module class in `replacements` swapped for its replacement (recursively)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, type) and spec in replacements:
        return replacements[spec]
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_replace_modules(spec.module, replacements),
                                   submodules=_replace_modules(spec.submodules, replacements))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _replace_modules(getattr(spec, f.name), replacements)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def block_spec(arch: ModelArch, config, use_te: bool, vp_stage: int | None):
    """The decoder spec of one model chunk: TE's as is; the local one with a final norm that allows
    sequence parallelism (megatron picks WrappedTorchNorm for it otherwise)."""
    spec = layer_spec(arch, use_te)
    if use_te:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=LocalRMSNorm)


# apex's CUDA extension that fuses the weight-gradient GEMM with the accumulation into main_grad. megatron-core
# imports it at module level (tensor_parallel/layers.py: `_grad_accum_fusion_available`), and
# `ColumnParallelLinear.__init__` raises a RuntimeError when config.gradient_accumulation_fusion is set without it;
# GPTModel's output layer is that class with the TE spec too (models/gpt/gpt_model.py, `output_layer_cls`). TE's own
# linear layers take the same flag as `fuse_wgrad_accumulation` (extensions/transformer_engine.py).
GRAD_ACCUM_FUSION_EXTENSION = "fused_weight_gradient_mlp_cuda"
_fusion_warned: list[bool] = []  # the fallback warning is printed once per process


@functools.cache
def grad_accum_fusion_available() -> bool:
    """Whether apex's fused weight-gradient extension imports (megatron-core's own test: an ImportError or not)."""
    try:
        importlib.import_module(GRAD_ACCUM_FUSION_EXTENSION)
    except ImportError:
        return False
    return True


def gradient_accumulation_fusion(on_gpu: bool, use_te: bool) -> bool:
    """TransformerConfig.gradient_accumulation_fusion: on with CUDA and TE when apex's extension is there; without
    it off, with one warning (rank 0, once per process) rather than megatron-core's RuntimeError at model build."""
    if not (on_gpu and use_te):
        return False
    if grad_accum_fusion_available():
        return True
    if not _fusion_warned and parallel.is_rank0():
        print(f"warning: apex's {GRAD_ACCUM_FUSION_EXTENSION} CUDA extension is not importable, so gradient "
              "accumulation fusion is off: every linear layer's weight gradient is computed into a temporary and "
              "then added to main_grad (slower backward, more memory), Transformer Engine's layers included. "
              "Get it by installing apex built with --cpp_ext --cuda_ext for this torch (the Docker image has it)",
              file=sys.stderr, flush=True)
    _fusion_warned.append(True)
    return False


def transformer_config(
    arch: ModelArch,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    fp8_format: str | None = None,
    fp8_recipe: str = "delayed",
    recompute_granularity: str | None = None,
    use_te: bool = False,
):
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        fp8=fp8_format,
        fp8_recipe=fp8_recipe if fp8_format else "delayed",
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        # Megatron-LM's defaults: interleaved schedules overlap p2p with compute through individual isend/irecv
        # (one direction on the PP group, the other on WORLD when PP=2, so a send of activations can never be
        # matched with a receive of gradients); plain 1F1B batches its p2p ops.
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
        variable_seq_lengths=True,  # RL batches have a different padded length every step
        moe_token_dispatcher_type="alltoall",  # dense models; only here because variable_seq_lengths demands it
        # As on a GPU, megatron allocates weights and buffers (rotary inv_freq, ...) on the device directly.
        use_cpu_initialization=not (on_gpu or platform.emulating()),
        # Fused kernels need CUDA (and apex/TE); the unfused paths compute the same function.
        bias_activation_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu and use_te,
        masked_softmax_fusion=on_gpu and use_te,
        apply_rope_fusion=on_gpu and use_te,
        gradient_accumulation_fusion=gradient_accumulation_fusion(on_gpu, use_te),
        persist_layer_norm=False,
    )


def build_model(arch: ModelArch, *, padded_vocab: int, use_te: bool, initialize: bool = True,
                **settings) -> tuple[object, list]:
    """The one way a Megatron model is built here (policy, reference policy, a3po-convert): (TransformerConfig,
    this rank's chunks). `settings` are transformer_config's layout / precision arguments; `initialize=False`
    skips the random init of weights that are loaded right after (billions of them, for nothing)."""
    config = transformer_config(arch, use_te=use_te, **settings)
    config.perform_initialization = initialize
    return config, build_model_chunks(arch, config, padded_vocab=padded_vocab, use_te=use_te)


def build_model_chunks(arch: ModelArch, config, *, padded_vocab: int, use_te: bool) -> list:
    """The GPTModel chunk(s) this rank holds: one per virtual pipeline stage (one if no VPP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(arch, config, use_te, stage),
            vocab_size=padded_vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,  # keep logits vocab-parallel; logprobs.py reduces across TP
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            vp_stage=stage,
        )
        chunks.append(model.to(platform.device()))
    return chunks
