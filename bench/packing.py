"""Packed (THD) micro-batches vs padding, side by side in one run (issue 13).

(a) Paper scale, simulated (no model): one RL step of 512 prompts x 8 responses on DP 8 (TP 2 with sequence
    parallelism, so packs are rounded to 2 tokens), mini-batches of 32 prompts, Qwen3-8B's shape for the cost
    model. Lengths: prompt ~ lognormal(median 600, sigma 0.5) clipped to [32, 2048], one per prompt; response ~
    lognormal(median 1800, sigma 0.9) clipped to [16, 8192] (the clipped ones are the truncated long tail).
    Three ways to feed the step to the model:
      whole-batch padding   every row padded to the longest sequence of the step (what the padded path does),
                            --micro-batch-size 2 rows, contiguous DP shares;
      per-micro-batch pad   the same micro-batches, each padded to its own longest row;
      packed + balanced     --max-tokens-per-gpu 20480 packs, each mini-batch's rows over DP by Karmarkar-Karp.
    Printed: computed / real tokens, attention FLOPs / real (causal, per sequence), DP imbalance (ranks wait at
    every optimizer step: sum of the slowest rank's cost / sum of the mean cost). Targets: packed computed/real
    <= 1.05, DP imbalance <= 1.05.
(b) Measured on CPU: the tiny qwen2 model (hidden 256, 4 layers, fp32, 1 rank) runs the training phase (old-
    log-prob pass + policy-loss forward/backward) on one long-tail batch of 64 rows (responses 8..512 tokens),
    padded (--micro-batch-size 8, whole-batch padding) vs packed (--max-tokens-per-gpu 2048); best of 2 runs
    each after a warm-up. Target: >= 2x.

    .venv/bin/python bench/packing.py            # both sections
    .venv/bin/python bench/packing.py --no-cpu   # (a) only
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_a3po import packing  # noqa: E402


def paper_lengths(seed: int = 0, prompts: int = 512, n: int = 8) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    for _ in range(prompts):
        prompt = min(max(int(rng.lognormvariate(6.4, 0.5)), 32), 2048)  # median e^6.4 ~ 600
        for _ in range(n):
            response = min(max(int(rng.lognormvariate(7.5, 0.9)), 16), 8192)  # median e^7.5 ~ 1800
            lengths.append(prompt + response - 1)
    return lengths


def simulate(dp: int = 8, tp: int = 2, mini_rows: int = 256, micro_batch_size: int = 2,
             max_tokens: int = 20480) -> list[tuple[str, float, float, float]]:
    lengths = paper_lengths()
    cost = packing.CostModel.for_model(hidden_size=4096, ffn_hidden_size=12288)  # Qwen3-8B
    real, real_attention = sum(lengths), sum(n * n for n in lengths)
    rows = []
    # whole-batch padding and per-micro-batch padding share the padded plan (contiguous shares, fixed rows)
    padded = packing.Batching(micro_batch_size=micro_batch_size, multiple=tp, cost=cost)
    plans = padded.plan(lengths, mini_rows, dp)
    width = -(-max(lengths) // tp) * tp
    whole = packing.plan_metrics(plans, lengths, width, padded)
    rows.append(("whole-batch padding", whole["train/computed_tokens"] / real,
                 len(lengths) * width * width / real_attention, whole["train/dp_imbalance"]))
    computed = attention = slowest = average = 0.0
    for m in range(len(plans[0].mini_batches)):
        costs = []
        for plan in plans:
            rank_cost = 0.0
            for micro in plan.mini_batches[m].rows:
                longest = -(-max(lengths[plan.rows[p]] for p in micro) // tp) * tp
                computed += len(micro) * longest
                attention += len(micro) * longest * longest
                rank_cost += len(micro) * cost(longest)
            costs.append(rank_cost)
        slowest, average = slowest + max(costs), average + sum(costs) / len(costs)
    rows.append(("per-micro-batch padding", computed / real, attention / real_attention, slowest / average))
    packed = packing.Batching(micro_batch_size=micro_batch_size, max_tokens=max_tokens, multiple=tp, cost=cost)
    packed_plans = packed.plan(lengths, mini_rows, dp)
    metrics = packing.plan_metrics(packed_plans, lengths, width, packed)
    attention = 0  # each sequence attends to itself only; a pack's rounding pad is one more (tiny) sequence
    for plan in packed_plans:
        for mini in plan.mini_batches:
            for micro in mini.rows:
                pack = [lengths[plan.rows[p]] for p in micro]
                attention += sum(n * n for n in pack) + (-sum(pack) % tp) ** 2
    rows.append(("packed + balanced", metrics["train/computed_tokens"] / real, attention / real_attention,
                 metrics["train/dp_imbalance"]))
    return rows


def _training_phase(hf_dir: str, packed: bool, repeats: int = 2) -> float:
    import torch

    from megatron_a3po import algorithms as A
    from megatron_a3po import parallel
    from megatron_a3po.config import Config
    from megatron_a3po.experience import (LogprobSettings, build_experience, compute_old_logprobs,
                                          policy_gradients, sequence_lengths)
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.rl_config import RLConfig, resolve_algorithm
    from megatron_a3po.models.families import load_hf_arch
    from megatron_a3po.rollout.sampling import pack_rollouts

    torch.set_num_threads(2)
    arch, _ = load_hf_arch(hf_dir)
    parallel.init_model_parallel(parallel.ParallelSizes(), seed=0)
    cfg = Config()
    cfg.model.make_vocab_size_divisible_by = 64
    policy = PolicyModel(cfg, arch, with_optimizer=False)
    policy.load_hf(hf_dir)
    rng = random.Random(1)
    responses = [[[rng.randrange(1, arch.vocab_size) for _ in range(min(max(int(rng.lognormvariate(4.0, 1.0)), 8),
                                                                        512))] for _ in range(8)] for _ in range(8)]
    batch = pack_rollouts([[1] * 8] * 8, responses, [[[-1.0] * len(r) for r in rs] for rs in responses],
                          [[False] * 8] * 8, pad_id=0)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(64)])
    adv = A.get_advantage_fn("grpo")(rewards, batch.response_mask.bool(), 8)
    lengths = sequence_lengths(batch)
    batching = packing.Batching(micro_batch_size=8, max_tokens=2048 if packed else None,
                                logprob_max_tokens=4096 if packed else None)
    plan = batching.plan(lengths, len(lengths), 1)[0]
    settings = LogprobSettings(temperature=1.0, vocab_size=arch.vocab_size)
    algorithm = resolve_algorithm(RLConfig(algorithm="dapo"))  # ppo_clip 0.2/0.28, token-mean
    best = float("inf")
    for attempt in range(repeats + 1):  # the first is a warm-up
        exp = build_experience(batch, rewards, adv, torch.tensor(plan.rows))
        start = time.perf_counter()
        compute_old_logprobs(policy, exp, plan.logprob_pass, settings)
        policy_gradients(policy, exp, plan.mini_batches[0], settings, algorithm, 1, 10, max_len=512)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def measure_cpu() -> tuple[float, float]:
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
    from megatron_a3po.spawn import run_in_ranks

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(write_tiny_hf_checkpoint(pathlib.Path(tmp) / "qwen2", "qwen2", seed=0,
                                              max_position_embeddings=1024))
        padded = run_in_ranks(_training_phase, 1, (hf_dir, False), timeout=1800)[0]
        packed = run_in_ranks(_training_phase, 1, (hf_dir, True), timeout=1800)[0]
    return padded, packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-cpu", action="store_true", help="skip (b), the measured CPU run")
    args = parser.parse_args()
    lengths = paper_lengths()
    print(f"(a) paper scale, simulated: {len(lengths)} sequences, mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"longest {max(lengths)}, DP 8, TP 2 + SP, mini-batch 256 rows")
    print(f"{'scheme':<26}{'computed/real':>15}{'attention/real':>16}{'DP imbalance':>14}")
    for name, tokens, attention, imbalance in simulate():
        print(f"{name:<26}{tokens:>15.4f}{attention:>16.4f}{imbalance:>14.4f}")
    if not args.no_cpu:
        padded, packed = measure_cpu()
        print("(b) measured on CPU, tiny qwen2, 64 rows of 8..512 response tokens: training phase "
              f"padded {padded:.2f} s, packed {packed:.2f} s, speed-up {padded / packed:.2f}x")


if __name__ == "__main__":
    main()
