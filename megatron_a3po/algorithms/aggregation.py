"""Loss aggregation with *global* normalisers, so a mini-batch's loss does not depend on its split.

A mini-batch is split into micro-batches (gradient accumulation) and across DP ranks. Each call of
`aggregate` returns this micro-batch's *share* of the mini-batch loss: the numerator is local, the
denominator is a count over the whole mini-batch on all DP ranks (`LossNormaliser`). Summing the shares of
all micro-batches on all DP ranks gives exactly the loss of the unsplit mini-batch, and so do the gradients.
The caller must therefore *sum* shares: if a framework averages over micro-batches or DP ranks, multiply
the share by num_microbatches and/or dp_size to undo that average.

Modes (m = mask, L_i = valid tokens of sequence i, S = sequences with L_i > 0, N = Σ L_i, all global):
    token-mean               Σ_{i,t} m·ℓ / N
    seq-mean-token-mean      Σ_i (Σ_t m·ℓ / L_i) / S
    seq-mean-token-sum       Σ_{i,t} m·ℓ / S
    seq-mean-token-sum-norm  Σ_{i,t} m·ℓ / (S · max_len)       (Dr. GRPO: max_len is a constant, e.g. the
                                                               configured max response length)
A sequence is never split across micro-batches, so L_i is always local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .common import check_choice, check_mask, check_tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNormaliser:
    global_tokens: float  # valid (loss-mask) tokens in the whole mini-batch, all DP ranks
    global_seqs: float  # sequences with >= 1 valid token in the whole mini-batch, all DP ranks
    max_len: int | None = None  # constant for seq-mean-token-sum-norm


def global_normaliser(
    masks: torch.Tensor | Sequence[torch.Tensor] | Iterable[torch.Tensor],
    *,
    dp_group=None,
    max_len: int | None = None,
) -> LossNormaliser:
    """Counts over every micro-batch mask of this rank's mini-batch, all-reduced over `dp_group`.

    masks: one [B, T] mask (the whole local mini-batch) or a list of micro-batch masks.
    dp_group: a torch.distributed ProcessGroup (None = no data parallelism, or the default group is
    not used: pass it explicitly when DP > 1).
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if not masks:
        raise ValueError("global_normaliser: no masks (every rank has at least one micro-batch)")
    # Counted where the masks live (the GPU), all-reduced there (NCCL takes device tensors only), read once.
    counts = torch.zeros(2, dtype=torch.float64, device=masks[0].device)
    for i, m in enumerate(masks):
        m = check_mask(f"masks[{i}]", m)
        counts += torch.stack([m.sum(), (m.sum(dim=1) > 0).sum()]).to(torch.float64)
    if dp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=dp_group)
    tokens, seqs = counts.tolist()
    return LossNormaliser(global_tokens=float(tokens), global_seqs=float(seqs), max_len=max_len)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    max_len: int | None = None,
    normaliser: LossNormaliser | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss (a scalar; see the module docstring).

    Pass either `normaliser` or the counts. A count left as None is taken from this `mask` alone, which is
    right only when this call sees the whole mini-batch (single micro-batch, no DP).
    """
    check_choice("loss_agg_mode", mode, AGG_MODES)
    mask = check_mask("mask", mask)
    check_tensor("loss_mat", loss_mat, shape=tuple(mask.shape))
    if normaliser is not None:
        global_tokens = normaliser.global_tokens if global_tokens is None else global_tokens
        global_seqs = normaliser.global_seqs if global_seqs is None else global_seqs
        max_len = normaliser.max_len if max_len is None else max_len
    masked = torch.where(mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "token-mean":
        denom = float(mask.sum()) if global_tokens is None else float(global_tokens)
        return masked.sum() / max(denom, 1.0)
    seq_denom = float((mask.sum(dim=1) > 0).sum()) if global_seqs is None else float(global_seqs)
    seq_denom = max(seq_denom, 1.0)
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(dim=1) / lengths).sum() / seq_denom
    if mode == "seq-mean-token-sum":
        return masked.sum() / seq_denom
    # seq-mean-token-sum-norm
    if max_len is None:
        raise ValueError(
            'loss_agg_mode="seq-mean-token-sum-norm" needs max_len: pass the configured max response length '
            "(a constant across steps, as Dr. GRPO requires)"
        )
    if int(max_len) < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return masked.sum() / (seq_denom * float(max_len))
