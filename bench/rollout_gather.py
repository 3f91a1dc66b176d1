"""Rollout gather, bytes per rank: pickled `all_gather_object` of every rank's results (before) vs tensors sent once
per rollout group (now, `rollout/gather.py`), side by side in one run, with identical results checked.

Two gloo ranks run both gathers on the same synthetic rollout (response lengths ~ lognormal, median 1800 tokens,
clipped to [16, 3072]: the paper's Qwen2.5-Math-7B regime, scaled to 64 prompts x 8 responses), once as one rollout
group of TP=2 and once as two groups of TP=1. Counted per rank: bytes in the buffers handed to collectives (what
each rank stages and receives; `all_gather_object` stages world-size copies of the largest pickle). Then the same
per-rank figures at the paper's size on 2 x 8 GPUs (512 x 8 responses, world 16), extrapolated per token.

    .venv/bin/python bench/rollout_gather.py
"""

from __future__ import annotations

import pathlib
import pickle
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS, N = 64, 8


def _synthetic(seed: int, prompts: list[int]):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in prompts:
        lengths = torch.exp(torch.randn(N, generator=g) * 0.6 + 7.5).clamp(16, 3072).long().tolist()
        responses = [torch.randint(0, 151_000, (n,), generator=g).tolist() for n in lengths]
        logprobs = [(-torch.rand(n, generator=g)).tolist() for n in lengths]
        out.append((responses, logprobs, [n == 3072 for n in lengths]))
    return out


def _rank(rollout_tp: int) -> dict:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from megatron_a3po.rollout import gather
    from megatron_a3po.rollout.engine import _split

    counted = {"bytes": 0}

    def counting(fn, pick):
        def wrapper(*args, **kwargs):
            counted["bytes"] += pick(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapper

    rank, world = dist.get_rank(), dist.get_world_size()
    group = rank // rollout_tp
    shares = _split(list(range(PROMPTS)), world // rollout_tp)
    local = _synthetic(group, shares[group])  # the same outputs on every rank of a group, as vLLM gives
    rows = [(i, k) for i in shares[group] for k in range(N)][rank % rollout_tp::rollout_tp]
    scored = [(i * N + k, float(i % 2)) for i, k in rows]

    saved = c10d.all_gather, dist.broadcast, dist.all_reduce
    c10d.all_gather = counting(c10d.all_gather, lambda out, *a, **k: sum(t.numel() * t.element_size() for t in out))
    dist.broadcast = counting(dist.broadcast, lambda t, *a, **k: t.numel() * t.element_size())
    dist.all_reduce = counting(dist.all_reduce, lambda t, *a, **k: t.numel() * t.element_size())
    try:
        gathered = [None] * world
        dist.all_gather_object(gathered, (group, shares[group], local, [(i, k, r) for (i, k), (_, r) in
                                                                          zip(rows, scored)], None))
        before = counted["bytes"]
        counted["bytes"] = 0
        rewards = gather.share_rewards(scored, PROMPTS * N, None)
        now = gather.share_results(shares, local, group, rollout_tp, N)
        after = counted["bytes"]
    finally:
        c10d.all_gather, dist.broadcast, dist.all_reduce = saved
    old = {i: res for _, indices, results, _, _ in gathered for i, res in zip(indices, results)}
    identical = all(old[i][0] == now[i][0] and old[i][2] == now[i][2] and
                    all(abs(a - b) < 1e-6 for x, y in zip(old[i][1], now[i][1]) for a, b in zip(x, y))
                    for i in range(PROMPTS))
    tokens = sum(len(r) for res in old.values() for r in res[0])
    pickled = len(pickle.dumps(gathered[rank]))
    return dict(before=before, after=after, identical=identical, tokens=tokens, pickled=pickled,
                rewards_ok=rewards.tolist() == [float(i % 2) for i in range(PROMPTS) for _ in range(N)])


def main() -> None:
    from megatron_a3po.spawn import run_in_ranks

    print(f"{PROMPTS} prompts x {N} responses, 2 gloo ranks; bytes per rank handed to collectives")
    print("| rollout groups | tokens | before (all_gather_object) | now (tensors) | before / now | identical |")
    print("|---|---|---|---|---|---|")
    paper = {}
    for rollout_tp in (2, 1):
        results = run_in_ranks(_rank, 2, (rollout_tp,), timeout=600)
        r = results[0]
        ok = all(x["identical"] and x["rewards_ok"] for x in results)
        print(f"| {2 // rollout_tp} x TP{rollout_tp} | {r['tokens']} | {r['before'] / 2**20:.1f} MiB | "
              f"{r['after'] / 2**20:.1f} MiB | {r['before'] / r['after']:.1f}x | {ok} |")
        paper[rollout_tp] = r
    # Paper size on 16 ranks: the largest pickle scales with the tokens a group holds; all_gather_object stages
    # world copies of it on every rank. The tensors: every token once (int32 + float32) plus 16 bytes per row.
    r = paper[1]
    per_token = r["pickled"] / (r["tokens"] / 2)  # one rank's pickle holds its group's half of the tokens
    tokens_16 = 512 * N * (r["tokens"] / (PROMPTS * N))
    for groups in (16, 8):  # rollout TP 1 and TP 2 on 16 GPUs
        before = 16 * per_token * tokens_16 / groups
        after = tokens_16 * 8 + 512 * N * (16 + 4)
        print(f"paper size, world 16, {groups} rollout groups: before ~{before / 2**30:.2f} GiB staged per rank, "
              f"now {after / 2**30:.3f} GiB received per rank ({before / after:.0f}x)")


if __name__ == "__main__":
    main()
