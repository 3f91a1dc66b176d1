"""Every rank gets the whole rollout batch: each rollout group's results as tensors, sent once, by its first rank.

All ranks of a rollout group (vLLM TP under external_launcher) hold identical outputs, so only the group's first rank
sends them: per group, a broadcast of the response lengths and finish flags, then one of the flat tokens and one of
the flat log-probs (int32 / float32). Rewards, scored by every rank for a disjoint share of the rows, meet in one
sum all-reduce over the batch (each row has exactly one non-zero contributor, so the sum is exact). Before this,
`all_gather_object` pickled every response as Python lists on every rank of every group, staging world-size copies
of the largest pickle on the device (~0.8 GB per rank at the paper's sizes): `bench/rollout_gather.py`.

Collectives run on the default group with device tensors (NCCL on GPUs), like every other collective of ours.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_a3po import platform

Result = tuple[list[list[int]], list[list[float]], list[bool]]  # one prompt's n responses, log-probs, truncated


def share_results(shares: list[list[int]], local: list[Result], group: int, rollout_tp: int, n: int
                  ) -> dict[int, Result]:
    """Collective: {prompt index: its result} for the whole batch; `shares[g]` are group g's prompt indices and
    `local` this rank's results for `shares[group]`, in order."""
    out: dict[int, Result] = {}
    for g, share in enumerate(shares):
        if not share:
            continue
        sender = g * rollout_tp
        mine = g == group and dist.get_rank() == sender
        rows = len(share) * n
        meta = torch.zeros(2 * rows, dtype=torch.int64)
        if mine:
            meta[:rows] = torch.tensor([len(r) for res in local for r in res[0]], dtype=torch.int64)
            meta[rows:] = torch.tensor([t for res in local for t in res[2]], dtype=torch.int64)
        meta = _broadcast(meta, sender)
        lengths = meta[:rows].tolist()
        total = sum(lengths)
        tokens, logprobs = torch.zeros(total, dtype=torch.int32), torch.zeros(total, dtype=torch.float32)
        if mine:
            tokens[:] = torch.tensor([t for res in local for r in res[0] for t in r], dtype=torch.int32)
            logprobs[:] = torch.tensor([x for res in local for lp in res[1] for x in lp], dtype=torch.float32)
        tokens, logprobs = _broadcast(tokens, sender).tolist(), _broadcast(logprobs, sender).tolist()
        truncated, start = [bool(t) for t in meta[rows:].tolist()], 0
        for p, i in enumerate(share):
            responses, lps = [], []
            for length in lengths[p * n: (p + 1) * n]:
                responses.append(tokens[start: start + length])
                lps.append(logprobs[start: start + length])
                start += length
            out[i] = (responses, lps, truncated[p * n: (p + 1) * n])
    return out


def share_rewards(scored: list[tuple[int, float]], num_rows: int, failure: str | None) -> torch.Tensor | str:
    """Collective: the batch's rewards (float32 [num_rows], on the host) from every rank's (row, reward) pairs, or
    the first rank's failure message when any rank's scoring failed (then every rank gets it)."""
    failed = _all_reduce(torch.tensor([1 if failure else 0], dtype=torch.int32), dist.ReduceOp.MAX)
    if failed.item():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, failure)  # the rare error path: the text travels as an object
        return next(m for m in messages if m)
    rewards = torch.zeros(num_rows, dtype=torch.float32)
    for row, reward in scored:
        rewards[row] = reward
    return _all_reduce(rewards, dist.ReduceOp.SUM)


def _broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    on_device = t.to(platform.device())
    dist.broadcast(on_device, src=src)
    return on_device.cpu()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    on_device = t.to(platform.device())
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()
