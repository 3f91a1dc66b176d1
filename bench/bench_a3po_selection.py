"""A3PO token selection: vectorised `a3po_token_weights` vs a naive per-row top-k loop, side by side.

The naive loop is what a straightforward port of the reference (verl) code does per response: find the
valid positions, k = max(1, int(L * ratio)), topk over exp(old_logprob), write the weight. Both produce
the same weights (checked here); the script prints both timings and their ratio.

    python bench/bench_a3po_selection.py                 # paper scale: 4096 responses x up to 8192 tokens
    python bench/bench_a3po_selection.py --rows 1024 --max-len 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from megatron_a3po.algorithms import get_advantage_fn  # noqa: E402
from megatron_a3po.algorithms.shaping import a3po_token_weights  # noqa: E402


def naive_loop(adv, old_lp, mask, step, ratio=0.2, rho=2.0, alpha=0.005):
    w_val = max(rho - alpha * step, 1.0)
    weights = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    probs = torch.exp(old_lp)
    for i in range(adv.shape[0]):
        a = float(adv[i])
        if a == 0:
            continue
        idx = mask[i].nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        k = max(1, int(idx.numel() * ratio))
        top = torch.topk(probs[i, idx], k, largest=(a < 0)).indices
        weights[i, idx[top]] = w_val
    return weights


def equivalent(w_a, w_b, old_lp):
    """Same selection up to tokens whose fp32 probabilities tie (topk breaks such ties arbitrarily; we rank by
    the log-prob and then by position): per row, the sorted probabilities of the selected tokens agree."""
    probs = torch.exp(old_lp)
    inf = torch.tensor(float("inf"))
    sel_a = torch.sort(torch.where(w_a != 1, probs, inf), dim=1).values
    sel_b = torch.sort(torch.where(w_b != 1, probs, inf), dim=1).values
    return torch.equal(sel_a, sel_b) and torch.equal(torch.sort(w_a, 1).values, torch.sort(w_b, 1).values)


def make_batch(rows, max_len, n_per_group, seed=0, min_len=64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    # old log-probs of sampled tokens: mostly confident, a heavy tail of low-probability tokens
    old_lp = -torch.empty(rows, max_len).exponential_(2.0, generator=g)
    rewards = (torch.rand(rows, generator=g) < 0.5).float()
    adv = get_advantage_fn("grpo")(rewards, mask, n_per_group).seq_advantages
    return adv, old_lp, mask


def best_of(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(rows, max_len, repeats, n_per_group=16):
    adv, old_lp, mask = make_batch(rows, max_len, n_per_group)
    n_tokens = int(mask.sum())
    t_vec, w_vec = best_of(lambda: a3po_token_weights(adv, old_lp, mask, step=1), repeats)
    t_naive, w_naive = best_of(lambda: naive_loop(adv, old_lp, mask, step=1), max(1, repeats // 2))
    same = torch.equal(w_vec, w_naive) or equivalent(w_vec, w_naive, old_lp)
    print(f"  {rows} x {max_len} ({n_tokens / 1e6:.1f}M valid tokens, {int((adv != 0).sum())} non-zero-advantage rows)")
    print(f"    vectorised a3po_token_weights: {t_vec * 1e3:9.1f} ms")
    print(f"    naive per-row topk loop      : {t_naive * 1e3:9.1f} ms")
    print(f"    speed-up (naive / vectorised): {t_naive / t_vec:9.1f}x   same selection: {same}")
    if not same:
        raise SystemExit("vectorised and naive weights differ")
    return t_naive / t_vec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short-len", type=int, default=512, help="second, overhead-bound regime (0 to skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default); use 1 on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, load avg {os.getloadavg()[0]:.1f}")
    print("paper scale:")
    run(args.rows, args.max_len, args.repeats)
    if args.short_len:
        print("short responses (per-row overhead dominates, as per-row kernel launches + syncs do on GPU):")
        run(args.rows, args.short_len, args.repeats)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process: {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
