"""The policy model as the trainer sees it: build + load, forward/backward through Megatron's schedule, step.

`PolicyModel` owns the Megatron pieces (GPTModel chunks wrapped in Megatron DDP, the Megatron optimizer and
LR scheduler) so `trainer.py` only speaks in batches, loss functions and steps.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from megatron_a3po import packing, platform
from megatron_a3po.config import Config, virtual_pipeline_size
from megatron_a3po.dtypes import params_dtype
from megatron_a3po.models import builder, hf_mapping
from megatron_a3po.models.families import ModelArch, padded_vocab_size

# loss_fn(logits_shard [b, s, V/tp] fp32-able, batch dict) -> (scalar loss, metrics dict of tensors)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class PolicyModel:
    def __init__(self, cfg: Config, arch: ModelArch, *, with_optimizer: bool = True, frozen: bool = False):
        """`frozen`: a reference policy for the KL penalty: forward only, no DDP wrapper (no gradient buffers), no
        optimizer, no random initialisation (its weights are loaded or copied right after)."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.cfg, self.arch = cfg, arch
        p, m = cfg.parallel, cfg.model
        self.use_te = builder.use_transformer_engine(m.transformer_impl)
        self.dtype = params_dtype(cfg.model)
        self.padded_vocab = padded_vocab_size(arch.vocab_size, m.make_vocab_size_divisible_by,
                                              p.tensor_model_parallel_size)
        self.tconfig, chunks = builder.build_model(
            arch, padded_vocab=self.padded_vocab, use_te=self.use_te, initialize=not frozen,
            tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
            vpp=virtual_pipeline_size(cfg, arch.num_layers), cp=p.context_parallel_size,
            sequence_parallel=p.sequence_parallel, params_dtype=self.dtype, fp8_format=m.fp8_format,
            fp8_recipe=m.fp8_recipe, recompute_granularity=m.recompute_granularity,
        )
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.token_multiple = packing.token_multiple_of(cfg)  # what every micro-batch's token dim is a multiple of
        self.dp_size = ps.get_data_parallel_world_size()
        self.optimizer = self.scheduler = None
        self.train_state_offloaded = False  # offload_train_state / restore_train_state
        if frozen:
            for chunk in chunks:
                chunk.requires_grad_(False)
            self.chunks = chunks
            return
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.training.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        from megatron.core.distributed import finalize_model_grads

        # What Megatron-LM's training loop wires up: grad all-reduces after the last micro-batch,
        # and no DP sync in between micro-batches.
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = (
            [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        )
        if with_optimizer:
            self._build_optimizer()

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.cfg.training
        opt_config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, bf16=self.dtype == torch.bfloat16,
            fp16=self.dtype == torch.float16, params_dtype=self.dtype,
            use_distributed_optimizer=t.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.chunks)
        self.tconfig.grad_scale_func = self.optimizer.scale_loss  # fp16 loss scaling; identity otherwise
        total = max(t.train_iters, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if t.lr_warmup_iters else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=total, lr_decay_style="constant" if t.min_lr == t.lr
            else "cosine", start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=total,
            wd_incr_style="constant",
        )

    # ---- memory handoff with vLLM ------------------------------------------------------------------------------

    def offload_train_state(self) -> None:
        """Free the DDP grad buffers and move the optimizer state to host while vLLM generates
        (--offload-train-during-rollout). megatron-core's own calls: DistributedDataParallel.offload_grad_buffers
        (each buffer's storage resized to 0; the param.main_grad and bucket views stay valid objects) and
        MegatronOptimizer.offload_to_cpu (moves every device tensor of the inner optimizer: its parameters, i.e.
        the fp32 main params under bf16/fp16, and Adam's moments). The weights stay: refit and the next step's
        forward read them. Idempotent."""
        if self.optimizer is None or self.train_state_offloaded:
            return
        for chunk in self.chunks:
            chunk.offload_grad_buffers(synchronize=True, empty_cache=False)
        self.optimizer.offload_to_cpu()  # ends with torch.cuda.empty_cache(): the freed blocks go back to CUDA
        self.train_state_offloaded = True

    def restore_train_state(self) -> None:
        """Undo offload_train_state before the step computes: grad buffers reallocated (zeroed, as
        zero_grad_buffer would) and the optimizer state back on the device, bitwise. Idempotent."""
        if not self.train_state_offloaded:
            return
        for chunk in self.chunks:
            chunk.restore_grad_buffers(synchronize=False)
        self.optimizer.restore_from_cpu()
        self.train_state_offloaded = False

    # ---- weights ----------------------------------------------------------------------------------------------

    def load_hf(self, hf_path: str) -> int:
        from megatron_a3po.models.hf_io import HFWeights

        weights = HFWeights(hf_path)
        loaded = hf_mapping.load_into_model(self.chunks, self.arch, weights.get, self.padded_vocab,
                                            self.tp_rank, self.tp_size, read_hf_into=weights.read_into)
        self.weights_loaded()
        return loaded

    def weights_loaded(self) -> None:
        """Call after writing weights into the model outside the optimizer (an HF or converted checkpoint). A
        bf16/fp16 optimizer keeps fp32 main params cloned from the weights when it was built; without this the
        first step writes that random initialisation back over the loaded weights. megatron-core's
        MegatronOptimizer.reload_model_params copies them over (what Megatron-LM's load_checkpoint calls when it
        loads no optimizer state); a no-op for the fp32 optimizer, whose params are the weights."""
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    def copy_weights_from(self, other: "PolicyModel") -> None:
        """This model's weights := `other`'s (same config and layout: the reference starts as the policy does)."""
        with torch.no_grad():
            for mine, theirs in zip(self.chunks, other.chunks):
                for p, q in zip(hf_mapping.unwrap(mine).parameters(), hf_mapping.unwrap(theirs).parameters()):
                    p.copy_(q)

    def hf_state(self, getter=lambda p: p.detach(), dtype: torch.dtype | None = None):
        """Collective generator of (hf_name, full tensor): weights by default, e.g. main_grad with a getter."""
        return hf_mapping.iter_hf_tensors(self.chunks, self.arch, self.padded_vocab,
                                          dtype=dtype or self.dtype, getter=getter)

    # ---- compute ----------------------------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[dict], loss_fn: LossFn, *, forward_only: bool = False) -> list[dict]:
        """Run all micro-batches through Megatron's schedule (1F1B / interleaved for PP>1).

        A micro-batch dict has `tokens`: padded rows [b, s] (long), or one pack [1, t] of sequences laid back
        to back (THD) with `cu_seqlens`, `max_seqlen` and `position_ids` (see experience.pack_rows); plus whatever
        loss_fn needs. loss_fn runs on the last pipeline stage and returns a scalar already normalised for the
        *whole* batch across all DP ranks (a sum divided by a global count); the schedule's 1/num_microbatches
        and DDP's 1/dp averaging are undone, so gradients do not depend on how the batch is split into
        micro-batches or DP ranks. Pipeline stages exchange activation shapes per micro-batch
        (variable_seq_lengths), so micro-batches may differ in shape.
        Returns the metrics dicts of the last stage (empty list on other stages).
        """
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = len(micro_batches)
        multiple = self.token_multiple
        for mb in micro_batches:
            if "cu_seqlens" in mb and (mb["tokens"].shape[0] != 1 or mb["tokens"].shape[1] % multiple):
                raise ValueError(f"a packed micro-batch is one row, padded to a multiple of {multiple} tokens "
                                 "(packing.token_multiple: TP under sequence parallelism, FP8's rule; "
                                 "experience.pack_rows does both)")
        device = platform.device()

        def step(data_iterator, model):
            batch = to_device(next(data_iterator), device)  # the one place a batch moves to the device
            tokens = batch["tokens"]
            seq_len = tokens.shape[1]
            packed = None
            if "cu_seqlens" in batch:
                packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch["cu_seqlens"],
                                         cu_seqlens_kv=batch["cu_seqlens"], max_seqlen_q=batch["max_seqlen"],
                                         max_seqlen_kv=batch["max_seqlen"])
                position_ids = batch["position_ids"]
            else:
                # Sequence parallelism scatters the sequence over the TP ranks, FP8 GEMMs want 16-row multiples:
                # pad to token_multiple. The padding comes after every real token, so causal attention keeps it
                # out of the real positions.
                model_len = model_width(seq_len, multiple)
                if model_len != seq_len:
                    tokens = torch.nn.functional.pad(tokens, (0, model_len - seq_len))
                position_ids = torch.arange(model_len, device=device).unsqueeze(0).expand_as(tokens)
            output = model(tokens, position_ids, None, packed_seq_params=packed)
            return output, partial(_loss_wrapper, loss_fn, batch, n * self.dp_size, seq_len)

        data = [iter(micro_batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro_batches)
        forward_backward = get_forward_backward_func()
        if not forward_only:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
        longest = max(mb["tokens"].shape[1] for mb in micro_batches)
        return forward_backward(  # seq_length / micro_batch_size: unused, shapes travel with the activations
            forward_step_func=step, data_iterator=data, model=self.chunks, num_microbatches=n,
            seq_length=model_width(longest, multiple), micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )

    def optimizer_step(self) -> dict:
        """finalize grads (DP / embedding all-reduce happens inside the schedule), clip, Adam step, LR step."""
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        success, grad_norm, _ = self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step(increment=1)
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "update_successful": bool(success), "lr": lr}


def model_width(seq_len: int, multiple: int) -> int:
    """The width padded rows [b, seq_len] have in the model: seq_len rounded up to `multiple` (token_multiple)."""
    return packing.round_up(seq_len, multiple)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (a no-op for those already there)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_wrapper(loss_fn: LossFn, batch: dict, undo_averaging: int, seq_len: int, output: torch.Tensor):
    loss, metrics = loss_fn(output[:, :seq_len], batch)
    # Megatron averages over micro-batches (schedule) and DP ranks (DDP); loss_fn already normalised globally.
    return loss * undo_averaging, metrics
