"""A3PO overhead relative to a policy-loss forward + backward on the same batch, side by side.

"Policy loss forward + backward" here is the cheapest honest version of it: LM head (hidden @ W) →
vocab-parallel log-probs (megatron_a3po.logprobs, TP=1) → PPO-clip with the shaped advantages →
token-mean → backward. A real step also runs the whole transformer forward/backward (orders of magnitude
more work) and A3PO runs once per RL step while the loss runs once per mini-batch and epoch, so the
printed ratio is an upper bound on A3PO's share of a step.

    python bench/bench_a3po_overhead.py
    python bench/bench_a3po_overhead.py --batch 64 --max-len 1024 --hidden 256 --vocab 16384
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from megatron_a3po.algorithms import AlgoContext, aggregate, get_advantage_fn, get_policy_loss  # noqa: E402
from megatron_a3po.algorithms.shaping import a3po_token_weights  # noqa: E402
from megatron_a3po.logprobs import vocab_parallel_logprobs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default); use 1 on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T, H, V = args.batch, args.max_len, args.hidden, args.vocab
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    hidden = torch.randn(B, T, H, generator=g)
    weight = (torch.randn(H, V, generator=g) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    adv = get_advantage_fn("grpo")(rewards, mask, 8)
    with torch.no_grad():
        old_lp = vocab_parallel_logprobs(hidden @ weight, targets).logprobs
    ppo = get_policy_loss("ppo_clip")

    def shaping():
        w = a3po_token_weights(adv.seq_advantages, old_lp, mask, step=10)
        return adv.token_advantages * w

    token_adv = shaping()

    def loss_fwd_bwd():
        weight.grad = None
        logits = hidden @ weight
        lp = vocab_parallel_logprobs(logits, targets).logprobs
        ctx = AlgoContext(response_mask=mask, advantages=token_adv, logprobs=lp, old_logprobs=old_lp)
        loss_mat, _ = ppo(ctx)
        aggregate(loss_mat, mask, "token-mean").backward()

    logits_leaf = (hidden @ weight).detach().requires_grad_()

    def head_free_fwd_bwd():  # no LM head: log-probs from given logits + PPO-clip + token-mean, fwd + bwd
        logits_leaf.grad = None
        lp = vocab_parallel_logprobs(logits_leaf, targets).logprobs
        ctx = AlgoContext(response_mask=mask, advantages=token_adv, logprobs=lp, old_logprobs=old_lp)
        loss_mat, _ = ppo(ctx)
        aggregate(loss_mat, mask, "token-mean").backward()

    def best(fn, n):
        fn()  # warm-up
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    # interleave the two measurements so machine load affects both alike
    t_shape, t_loss, t_head_free = float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):
        t_loss = min(t_loss, best(loss_fwd_bwd, 1))
        t_head_free = min(t_head_free, best(head_free_fwd_bwd, 1))
        t_shape = min(t_shape, best(shaping, 3))
    n_tok = int(mask.sum())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    print(f"batch {B} x {T} ({n_tok} valid tokens), hidden {H}, vocab {V}")
    print(f"  policy loss fwd+bwd (LM head + log-probs + PPO-clip + token-mean): {t_loss * 1e3:9.1f} ms")
    print(f"  A3PO token weights + shaping (once per RL step)                  : {t_shape * 1e3:9.2f} ms")
    print(f"  log-probs + PPO-clip + token-mean only (no LM head), fwd+bwd      : {t_head_free * 1e3:9.1f} ms")
    print(f"  A3PO / policy-loss fwd+bwd: {100 * t_shape / t_loss:.2f}%  (target <= 1%)")
    print(f"  A3PO / loss without LM head (stricter): {100 * t_shape / t_head_free:.2f}%")


if __name__ == "__main__":
    main()
