"""Vectorised per-row "k smallest keys" selection with a different k in every row.

This is the kernel behind A3PO, the token-weighted ablation grid and the 80/20 fork-token mask.
Semantics (what the naive reference in the tests implements with a Python loop per row):

    for each row r with k[r] > 0: among the positions where valid[r] is True, select the k[r] positions
    with the smallest key; ties are broken by the earliest position.

Because every row is handled independently and ties are broken by position among *valid* tokens only,
the result does not depend on padding (left, right or interleaved) nor on which other rows share the batch.

How it is fast: rows are ordered by their last valid position and processed in chunks whose width is the
chunk's longest row (so padding costs almost nothing), one selection per chunk finds each row's k-th
smallest value (the threshold, `torch.kthvalue`: a selection, not a sort), and one comparison picks
`key <= threshold`; rows where more than k entries tie at the threshold keep the earliest ties.
There is no Python loop over rows and a few host syncs per chunk.
"""

from __future__ import annotations

import torch

# Elements per processing chunk (rows x width). Bounds the temporaries (~ budget x 14 bytes: key copy,
# kthvalue's working copy, masks) and keeps the padding inside a chunk small; large enough to amortise
# the ~15 small ops per chunk.
_CHUNK_ELEMS = 1 << 20
_CHUNK_ELEMS_CUDA = 1 << 24  # on GPU fewer, larger chunks: each chunk costs a few host syncs


def k_from_ratio(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_i = max(1, floor(ratio * L_i)) for L_i > 0, and 0 for empty rows (nothing to select).

    The floor is taken in float64 so e.g. 0.2 * 5 gives exactly 1 (not 0.999..).
    """
    lengths = lengths.to(torch.int64)
    k = torch.floor(lengths.to(torch.float64) * float(ratio) + 1e-9).to(torch.int64)
    k = torch.clamp(k, min=1)
    k = torch.minimum(k, lengths)
    return torch.where(lengths > 0, k, torch.zeros_like(k))


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """int64 [R]: True entries per row (int32 accumulation: bool row sums are slow on CPU)."""
    return mask.sum(dim=1, dtype=torch.int32).to(torch.int64)


def select_k_smallest(
    key: torch.Tensor,
    valid: torch.Tensor,
    k: torch.Tensor,
    *,
    row_sign: torch.Tensor | None = None,
    name: str = "key",
    chunk_elems: int | None = None,
) -> torch.Tensor:
    """Bool mask [R, T]: per row the k[r] smallest `key` entries among `valid` ones (ties: earliest first).

    key: float [R, T]; valid: bool [R, T]; k: int [R], 0 <= k[r] <= valid[r].sum().
    row_sign: optional float [R] of +-1 applied to each row's key first (select the largest with -1) without
    materialising a signed copy of the whole tensor. Non-finite keys inside `valid` raise ValueError naming
    `name`; values outside `valid` are ignored (padding may hold anything).
    """
    out = torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    for rows, width, selected in iter_selected_chunks(key, valid, k, row_sign=row_sign, name=name, chunk_elems=chunk_elems):
        out[rows, :width] = selected
    return out


def iter_selected_chunks(key, valid, k, *, row_sign=None, name="key", chunk_elems=None):
    """Yield (rows, width, selected[len(rows), width]) covering every row with k > 0 (see select_k_smallest).

    Consumers that need something other than a bool mask (A3PO writes weights) use this directly and never
    materialise the full-size mask.
    """
    if key.shape != valid.shape or key.dim() != 2:
        raise ValueError(f"{name} {tuple(key.shape)} and its mask {tuple(valid.shape)} must be the same 2-D shape")
    if k.shape != (key.shape[0],):
        raise ValueError(f"k must have shape ({key.shape[0]},), got {tuple(k.shape)}")
    R, T = key.shape
    if R == 0 or T == 0:
        return
    if chunk_elems is None:
        chunk_elems = _CHUNK_ELEMS_CUDA if key.is_cuda else _CHUNK_ELEMS
    k = k.to(device=key.device, dtype=torch.int64)
    active = torch.nonzero(k > 0, as_tuple=True)[0]
    if active.numel() == 0:
        return
    positions = torch.arange(1, T + 1, device=key.device, dtype=torch.int32)
    ends = (valid[active] * positions).amax(dim=1)  # last valid position + 1
    # Longest rows first: every chunk's width is its first row's end, so padding costs little.
    order = torch.argsort(ends, descending=True, stable=True)
    rows_sorted = active[order]
    ends_sorted = ends[order].tolist()  # the one host sync for the whole plan
    if row_sign is not None:
        row_sign = row_sign.to(device=key.device, dtype=torch.float32)
    start, n = 0, len(ends_sorted)
    while start < n:
        width = max(int(ends_sorted[start]), 1)
        stop = min(n, start + max(1, chunk_elems // width))
        rows = rows_sorted[start:stop]
        chunk = key[rows, :width]  # a fresh copy that _select_chunk may modify
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        sign = row_sign[rows] if row_sign is not None else None
        yield rows, width, _select_chunk(chunk, ~valid[rows, :width], k[rows], sign, name)
        start = stop


def _select_chunk(chunk, invalid, k, sign, name):
    if sign is not None:
        chunk.mul_(sign.to(chunk.dtype).unsqueeze(1))
    total = chunk.masked_fill_(invalid, 0.0).sum()
    if not bool(torch.isfinite(total)):
        bad = int((~torch.isfinite(chunk)).sum())
        raise ValueError(f"{name} has {bad} non-finite values inside the mask; check the log-prob/entropy computation")
    big = chunk.masked_fill_(invalid, float("inf"))
    k_min, k_max = int(k.min()), int(k.max())
    if k_max > big.shape[1]:
        raise ValueError("k must not exceed the number of valid entries of its row")
    if k_min == k_max:
        kth = torch.kthvalue(big, k_max, dim=1, keepdim=True).values
    else:
        # Different k per row: append (k_max - k_r) -inf columns to row r (and +inf to fill), so the k_max-th
        # smallest of every augmented row is the k_r-th smallest of the original row. Rows in a chunk have
        # similar lengths, so k_max - k_min (the extra width) is small.
        extra = k_max - k_min
        aug = torch.empty((big.shape[0], big.shape[1] + extra), dtype=big.dtype, device=big.device)
        aug[:, : big.shape[1]] = big
        pad = torch.arange(extra, device=big.device).unsqueeze(0) < (k_max - k).unsqueeze(1)
        aug[:, big.shape[1]:] = torch.where(pad, float("-inf"), float("inf"))
        kth = torch.kthvalue(aug, k_max, dim=1, keepdim=True).values
        del aug
    if bool(torch.isinf(kth).any()):  # the k-th smallest is padding: k exceeds the row's valid entries
        raise ValueError("k must not exceed the number of valid entries of its row")
    selected = big <= kth  # padding is +inf and the k-th value is finite: never selected
    excess = row_counts(selected) > k  # more than k entries tie at the threshold
    tie_rows = torch.nonzero(excess, as_tuple=True)[0]
    if tie_rows.numel() > 0:
        # Keep the entries below the threshold plus the first ties, in position order.
        sub = big[tie_rows]
        thr = kth[tie_rows]
        less = sub < thr
        eq = sub == thr
        need = k[tie_rows] - row_counts(less)
        selected[tie_rows] = less | (eq & (eq.cumsum(dim=1) <= need.unsqueeze(1)))
    return selected
