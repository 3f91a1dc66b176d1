"""Target-token log-probs and token entropy from vocab-parallel logits (Megatron's output layer layout).

Works with or without Megatron: pass this rank's logits shard [..., V/tp] and the tensor-parallel
`tp_group` (a torch.distributed ProcessGroup; None = the logits are not sharded). Rank r of the group
holds global vocab ids [r * V_shard, (r + 1) * V_shard). Per chunk of tokens the forward does two
all-reduces on the group: MAX of the row max, then one SUM of the stacked [sum-exp, target logit (masked
gather: only the owning rank contributes), Σ exp·x (entropy), min-p mass (proxy)].

Memory: the math is fp32 but only one chunk of rows is ever upcast (at most two fp32 [chunk, V_shard]
buffers, each <= 32 MiB and <= 1/16 of the logits' bytes). Nothing of vocab size is saved for backward
beyond the input logits themselves: the backward recomputes the softmax chunk by chunk from three saved
per-token fp32 statistics (row max, log-sum-exp, mean logit) and writes straight into the gradient tensor.
The backward needs no communication: a rank's logit gradient depends only on its shard and those
(already global) statistics.

Entropy is differentiable only with `entropy_grad=True` (an entropy bonus needs it); otherwise it is
returned detached and its backward never runs. Targets are aligned with the logits positions: for a causal
LM pass labels = input_ids shifted left by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_CHUNK_BYTES = 32 * 1024 * 1024  # fp32 bytes of one [chunk, V_shard] working buffer (default chunking)


@dataclass
class TokenLogProbs:
    logprobs: torch.Tensor  # fp32, shape of targets: log pi(target) at `temperature`
    entropy: torch.Tensor | None = None  # fp32, shape of targets (only with compute_entropy=True)
    proxy_logprobs: torch.Tensor | None = None  # fp32: log pi_proxy(target) of the min-p proxy, -inf outside it


def _group_info(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_reduce(tensor: torch.Tensor, tp_group, op: str) -> None:
    if tp_group is None:
        return
    import torch.distributed as dist

    if dist.get_world_size(group=tp_group) == 1:
        return
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=tp_group)


def default_chunk_rows(n_rows: int, shard_vocab: int, itemsize: int = 4) -> int:
    """Rows per chunk: one fp32 [chunk, V_shard] buffer is at most 32 MiB and at most 1/16 of the logits' bytes,
    so the (at most two) working buffers stay a small fraction of the logits whatever their size or dtype."""
    by_bytes = _CHUNK_BYTES // (4 * max(shard_vocab, 1))
    by_fraction = (n_rows * itemsize) // 64  # 4 bytes x rows / 16 of (n_rows * itemsize) per vocab column
    return max(1, min(by_bytes, by_fraction))


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_start, n_valid, temperature, chunk, want_entropy, entropy_grad, log_kappa):
        ctx.set_materialize_grads(False)
        v_shard = logits.shape[-1]
        x2d = logits.reshape(-1, v_shard)
        t1d = targets.reshape(-1)
        n = x2d.shape[0]
        dev = logits.device
        f32 = torch.float32
        row_maxes = torch.empty(n, dtype=f32, device=dev)  # max_v x, x = logits / T (global over TP)
        log_sums = torch.empty(n, dtype=f32, device=dev)  # log sum_v exp(x - max): log p = x - max - log_sum
        mean_x = torch.empty(n, dtype=f32, device=dev) if (want_entropy and entropy_grad) else None  # sum_v p (x - max)
        logp = torch.empty(n, dtype=f32, device=dev)
        ent = torch.empty(n, dtype=f32, device=dev) if want_entropy else None
        proxy = torch.empty(n, dtype=f32, device=dev) if log_kappa is not None else None
        n_stats = 2 + int(want_entropy) + int(log_kappa is not None)
        for s in range(0, n, chunk):
            e_ = min(n, s + chunk)
            x = x2d[s:e_, :n_valid].to(f32, copy=True)
            if temperature != 1.0:
                x.div_(temperature)
            if n_valid > 0:
                row_max = x.amax(dim=1)
            else:
                row_max = torch.full((e_ - s,), float("-inf"), dtype=f32, device=dev)
            _all_reduce(row_max, tp_group, "max")
            x.sub_(row_max.unsqueeze(1))  # x' = x - max <= 0
            local_t = t1d[s:e_] - vocab_start
            owned = (local_t >= 0) & (local_t < n_valid)
            stats = torch.zeros((n_stats, e_ - s), dtype=f32, device=dev)
            if n_valid > 0:
                tgt = x.gather(1, local_t.clamp(0, n_valid - 1).unsqueeze(1)).squeeze(1)
                stats[1] = torch.where(owned, tgt, torch.zeros((), dtype=f32, device=dev))
            # log-prob only: exponentiate in place (one fp32 buffer); entropy / min-p also need x' itself
            ex = torch.exp(x) if (want_entropy or log_kappa is not None) else x.exp_()
            stats[0] = ex.sum(dim=1)
            outside = (x < log_kappa) if log_kappa is not None else None  # p < kappa * p_max (bool, 1 byte/elem)
            i = 2
            if want_entropy:
                stats[i] = x.mul_(ex).sum(dim=1)  # Σ exp(x') x' (in place: x is not needed afterwards)
                i += 1
            if log_kappa is not None:
                stats[i] = ex.masked_fill_(outside, 0.0).sum(dim=1)  # mass of tokens with p >= kappa * p_max
            del ex, x
            _all_reduce(stats, tp_group, "sum")
            log_s = torch.log(stats[0])
            logp[s:e_] = stats[1] - log_s
            row_maxes[s:e_] = row_max
            log_sums[s:e_] = log_s
            if want_entropy:
                mean_c = stats[2] / stats[0]
                ent[s:e_] = log_s - mean_c
                if mean_x is not None:
                    mean_x[s:e_] = mean_c
            if log_kappa is not None:
                in_support = stats[1] >= log_kappa
                proxy[s:e_] = torch.where(in_support, stats[1] - torch.log(stats[n_stats - 1]),
                                          torch.full((), float("-inf"), dtype=f32, device=dev))
        ctx.save_for_backward(logits, targets, row_maxes, log_sums, mean_x)
        ctx.meta = (vocab_start, n_valid, temperature, chunk)
        outs = [logp.reshape(targets.shape)]
        outs.append(ent.reshape(targets.shape) if want_entropy else None)
        outs.append(proxy.reshape(targets.shape) if proxy is not None else None)
        if want_entropy and not entropy_grad:
            ctx.mark_non_differentiable(outs[1])
        if proxy is not None:
            ctx.mark_non_differentiable(outs[2])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_proxy):
        logits, targets, row_maxes, log_sums, mean_x = ctx.saved_tensors
        vocab_start, n_valid, temperature, chunk = ctx.meta
        if mean_x is None:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * 10
        v_shard = logits.shape[-1]
        x2d = logits.reshape(-1, v_shard)
        t1d = targets.reshape(-1)
        n = x2d.shape[0]
        f32 = torch.float32
        g_lp = g_logp.reshape(-1).to(f32) if g_logp is not None else None
        g_h = g_ent.reshape(-1).to(f32) if g_ent is not None else None
        grad = torch.empty_like(x2d)
        if n_valid < v_shard:
            grad[:, n_valid:] = 0
        for s in range(0, n, chunk):
            e_ = min(n, s + chunk)
            if n_valid == 0:
                continue
            x = x2d[s:e_, :n_valid].to(f32, copy=True)
            if temperature != 1.0:
                x.div_(temperature)
            x.sub_(row_maxes[s:e_].unsqueeze(1))  # x' = x - max, bitwise as in the forward
            if g_h is None:  # log-prob only: p in place (one fp32 buffer)
                p = x.sub_(log_sums[s:e_].unsqueeze(1)).exp_()
            else:
                p = (x - log_sums[s:e_].unsqueeze(1)).exp_()
            if g_h is not None:
                # dH/dx = -p (log p + H) = -p (x' - sum_v p x'): no large log-normaliser in the difference
                x.sub_(mean_x[s:e_].unsqueeze(1)).mul_(p).mul_(-g_h[s:e_].unsqueeze(1))
                if g_lp is not None:
                    x.addcmul_(p, g_lp[s:e_].unsqueeze(1), value=-1.0)
                out = x
            else:
                out = p.mul_(-g_lp[s:e_].unsqueeze(1))  # d log p_t / dx = onehot - p
            if g_lp is not None:
                local_t = t1d[s:e_] - vocab_start
                owned = (local_t >= 0) & (local_t < n_valid)
                rows = torch.nonzero(owned, as_tuple=True)[0]
                out[rows, local_t[rows]] += g_lp[s:e_][rows]
            if temperature != 1.0:
                out.div_(temperature)
            grad[s:e_, :n_valid].copy_(out)
            del x, p, out
        return grad.reshape(logits.shape), None, None, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    entropy_grad: bool = False,
    vocab_size: int | None = None,
    minp_kappa: float | None = None,
    chunk_size: int | None = None,
) -> TokenLogProbs:
    """Log pi(target) (and entropy, min-p proxy log-prob) of softmax(logits / temperature) over the full vocab.

    logits: this rank's shard [..., V_shard] (any float dtype; math in fp32); targets: int [...] global ids.
    tp_group: TP ProcessGroup or None (unsharded). vocab_size: the true vocab size when the (global) vocab
    was padded (Megatron pads to a multiple): ids >= vocab_size are excluded from the softmax.
    minp_kappa: also return log pi_proxy(target) for the min-p proxy (Lp-Reg): tokens with
    p >= kappa * max p, renormalised; -inf for targets outside that set. chunk_size: rows per chunk.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [..., vocab_shard], got {getattr(logits, 'shape', type(logits))}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(getattr(targets, 'shape', ()))}; "
            "targets are the next-token ids aligned with the logits positions"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if entropy_grad and not compute_entropy:
        raise ValueError("entropy_grad=True needs compute_entropy=True")
    if minp_kappa is not None and not 0.0 < float(minp_kappa) <= 1.0:
        raise ValueError(f"minp_kappa must be in (0, 1] (Lp-Reg uses 0.02) or None, got {minp_kappa}")
    rank, world = _group_info(tp_group)
    v_shard = logits.shape[-1]
    total = v_shard * world
    vocab_size = total if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= total:
        raise ValueError(f"vocab_size must be in [1, {total}] (shard {v_shard} x tp {world}), got {vocab_size}")
    if targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"targets must be token ids in [0, {vocab_size}), got range [{lo}, {hi}]; replace padding positions' "
                "targets by a valid id (e.g. 0) and mask them out of the loss"
            )
    vocab_start = rank * v_shard
    n_valid = max(0, min(v_shard, vocab_size - vocab_start))
    n_rows = targets.numel()
    if chunk_size is None:
        chunk = default_chunk_rows(n_rows, v_shard, logits.element_size())
    else:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}")
        chunk = int(chunk_size)
    log_kappa = math.log(float(minp_kappa)) if minp_kappa is not None else None
    if not logits.is_contiguous():
        logits = logits.contiguous()
    lp, ent, proxy = _VocabParallelLogProbs.apply(
        logits, targets, tp_group, vocab_start, n_valid, float(temperature), chunk, bool(compute_entropy),
        bool(entropy_grad), log_kappa,
    )
    return TokenLogProbs(logprobs=lp, entropy=ent, proxy_logprobs=proxy)


def logprobs_from_logits(logits, targets, tp_group=None, *, temperature=1.0, vocab_size=None, chunk_size=None) -> torch.Tensor:
    """Just log pi(target) [...] (fp32)."""
    return vocab_parallel_logprobs(logits, targets, tp_group, temperature=temperature, vocab_size=vocab_size,
                                   chunk_size=chunk_size).logprobs
