"""Packed (THD) micro-batches: the plans (pure functions), and packed vs padded numerics in real Megatron.

Parity: one 2-rank process group runs three layouts (TP=1 with DP=2, TP=2 with sequence parallelism, PP=2)
over one rollout batch of unbalanced lengths, fp32. For each, the old-log-prob pass and the policy-loss
backward run padded (fixed micro-batch rows, contiguous DP shares) and packed (token-budget packs, DP ranks
balanced by cost); old log-probs, entropy, the policy loss and every gradient must agree within 1e-5.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_a3po import packing
from megatron_a3po.spawn import run_in_ranks

# ---- plans (no process group) -----------------------------------------------------------------------------


def test_balanced_partition_is_a_partition_and_near_equal():
    rng = random.Random(0)
    costs = [rng.lognormvariate(5, 1) for _ in range(256)]
    for parts in (2, 3, 8):
        groups = packing.balanced_partition(costs, parts)
        assert sorted(i for g in groups for i in g) == list(range(len(costs)))
        totals = [sum(costs[i] for i in g) for g in groups]
        assert max(totals) / (sum(totals) / parts) < 1.01, (parts, totals)
    # One sequence heavier than all others together: it gets a rank of its own, nobody is left empty.
    groups = packing.balanced_partition([100.0, 1.0, 1.0, 1.0], 3)
    assert [0] in groups and all(groups)
    with pytest.raises(ValueError, match="cannot split 1 sequences over 2"):
        packing.balanced_partition([1.0], 2)


def test_token_budget_bins_respect_the_budget_and_the_multiple():
    rng = random.Random(1)
    lengths = [rng.randint(1, 60) for _ in range(100)]
    bins = packing.token_budget_bins(lengths, 128, multiple=4)
    assert sorted(i for b in bins for i in b) == list(range(100))
    assert all(-(-sum(lengths[i] for i in b) // 4) * 4 <= 128 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 128) + 2  # first-fit decreasing: close to the lower bound
    with pytest.raises(ValueError, match="does not fit a budget of 16"):
        packing.token_budget_bins([10, 17], 16)
    with pytest.raises(ValueError, match="does not fit"):  # 15 rounds up to 16 > 15 under SP with TP=2
        packing.token_budget_bins([15], 15, multiple=2)


def test_plans_cover_every_row_once_and_padded_plans_keep_todays_split():
    lengths = [5, 40, 7, 33, 12, 9, 28, 3]
    padded = packing.Batching(micro_batch_size=2).plan(lengths, mini_batch_rows=4, dp_size=2)
    assert [p.rows for p in padded] == [[0, 1, 4, 5], [2, 3, 6, 7]]  # contiguous shares of each mini-batch
    assert padded[0].mini_batches[0].rows == [[0, 1]] and not padded[0].logprob_pass.packed
    packed = packing.Batching(micro_batch_size=2, max_tokens=48,
                              cost=packing.CostModel.for_model(64, 176)).plan(lengths, 4, 2)
    assert sorted(r for p in packed for r in p.rows) == list(range(8))
    for plan in packed:  # each mini-batch's rows stay in that mini-batch
        first = [plan.rows[i] for mb in plan.mini_batches[0].rows for i in mb]
        assert all(r < 4 for r in first)
    metrics = packing.plan_metrics(packed, lengths, max(lengths), packing.Batching(2, max_tokens=48))
    assert metrics["train/real_tokens"] == sum(lengths) == metrics["train/computed_tokens"]
    assert packing.plan_metrics(padded, lengths, 40, packing.Batching(2))["train/computed_tokens"] == 8 * 40


# ---- packed vs padded in Megatron (2 ranks) ---------------------------------------------------------------

LAYOUTS = {"TP=1 DP=2": (1, 1, False), "TP=2 SP": (2, 1, True), "PP=2": (1, 2, False)}


def _rollout(vocab: int):
    from megatron_a3po.rollout.sampling import pack_rollouts

    g = torch.Generator().manual_seed(3)
    prompts, responses, logprobs, truncated = [], [], [], []
    for p in range(4):  # 4 prompts x 4 responses, lengths 2..30: unbalanced rows
        prompts.append(torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist())
        lens = [int(torch.randint(2, 30, (1,), generator=g)) for _ in range(4)]
        responses.append([torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens])
        logprobs.append([(-torch.rand(n, generator=g)).tolist() for n in lens])
        truncated.append([False] * 4)
    return pack_rollouts(prompts, responses, logprobs, truncated, pad_id=0)


def _packed_vs_padded(hf_dir: str):
    from megatron_a3po import algorithms as A
    from megatron_a3po import parallel
    from megatron_a3po.config import Config
    from megatron_a3po.experience import (LogprobSettings, build_experience, compute_old_logprobs,
                                          policy_gradients, sequence_lengths)
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.rl_config import RLConfig, resolve_algorithm
    from megatron_a3po.models.families import load_hf_arch

    arch, _ = load_hf_arch(hf_dir)
    batch = _rollout(arch.vocab_size)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * 4)
    adv = A.get_advantage_fn("grpo")(rewards, batch.response_mask.bool(), 4)
    lengths = sequence_lengths(batch)
    settings = LogprobSettings(temperature=1.0, vocab_size=arch.vocab_size)
    algorithm = resolve_algorithm(RLConfig(algorithm="dapo", entropy_coef=0.01))  # ppo_clip 0.2/0.28, token-mean
    results = {}
    for label, (tp, pp, sp) in LAYOUTS.items():
        cfg = Config()
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
        cfg.parallel.sequence_parallel = sp
        cfg.model.make_vocab_size_divisible_by = 64
        parallel.init_model_parallel(parallel.ParallelSizes(tensor=tp, pipeline=pp), seed=0)
        policy = PolicyModel(cfg, arch, with_optimizer=False)
        policy.load_hf(hf_dir)
        multiple = tp if sp else 1
        cost = packing.CostModel.for_model(arch.hidden_size, arch.ffn_hidden_size)
        out = {}
        for mode, batching in (("padded", packing.Batching(micro_batch_size=2, multiple=multiple)),
                               ("packed", packing.Batching(micro_batch_size=2, max_tokens=48, logprob_max_tokens=80,
                                                           multiple=multiple, cost=cost))):
            mine = batching.plan(lengths, 16, parallel.dp_size())[parallel.dp_rank()]
            exp = build_experience(batch, rewards, adv, torch.tensor(mine.rows))
            filled = compute_old_logprobs(policy, exp, mine.logprob_pass, settings)
            outputs = policy_gradients(policy, exp, mine.mini_batches[0], settings, algorithm, 1, 10, max_len=30)
            grads = dict(policy.hf_state(getter=lambda p: p.main_grad, dtype=torch.float32))
            keep = filled and parallel.tp_rank() == 0  # one copy per DP replica
            rows = {r: (exp.old_logprobs[i, :n].clone(), exp.old_entropy[i, :n].clone())
                    for i, (r, n) in enumerate(zip(mine.rows, exp.lengths))} if keep else {}
            loss_sum = float(sum(o["pg_loss_share"] for o in outputs)) if keep else 0.0
            out[mode] = (rows, loss_sum, {k: v.clone() for k, v in grads.items()}, len(mine.logprob_pass.rows))
        results[label] = out
    return results


def test_packed_matches_padded_in_every_layout(tmp_path):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    hf_dir = str(write_tiny_hf_checkpoint(tmp_path / "qwen2", "qwen2", seed=1))
    ranks = run_in_ranks(_packed_vs_padded, 2, (hf_dir,), timeout=600)
    for label in LAYOUTS:
        merged = {}
        for mode in ("padded", "packed"):
            rows, loss, grads = {}, 0.0, None
            for result in ranks:
                r_rows, r_loss, r_grads, _ = result[label][mode]
                rows.update(r_rows)
                loss += r_loss
                grads = r_grads  # gradients are all-reduced: every rank holds the whole mini-batch's
            merged[mode] = (rows, loss, grads)
        (pad_rows, pad_loss, pad_grads), (pk_rows, pk_loss, pk_grads) = merged["padded"], merged["packed"]
        assert sorted(pad_rows) == sorted(pk_rows) == list(range(16)), label
        for r in range(16):
            torch.testing.assert_close(pk_rows[r][0], pad_rows[r][0], atol=1e-5, rtol=0, msg=f"{label} logp row {r}")
            torch.testing.assert_close(pk_rows[r][1], pad_rows[r][1], atol=1e-5, rtol=0, msg=f"{label} ent row {r}")
        assert pad_loss != 0 and abs(pk_loss - pad_loss) < 1e-5, (label, pk_loss, pad_loss)
        assert pad_grads.keys() == pk_grads.keys()
        assert max(g.abs().max().item() for g in pad_grads.values()) > 1e-4  # a real gradient
        for name in pad_grads:
            torch.testing.assert_close(pk_grads[name], pad_grads[name], atol=1e-5, rtol=0, msg=f"{label} {name}")
        # packing needed fewer forward passes than padded rows of 2
        assert ranks[0][label]["packed"][3] < ranks[0][label]["padded"][3], label


# ---- refusals (no process group) --------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--max-tokens-per-gpu", "16"], r"--max-tokens-per-gpu 16 cannot hold the longest sequence \(23 tokens"),
    (["--max-tokens-per-gpu", "24", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--log-probs-max-tokens-per-gpu", "23"], r"--log-probs-max-tokens-per-gpu 23 .*\(24 tokens.*multiple of TP"),
    (["--log-probs-max-tokens-per-gpu", "64"], "needs --max-tokens-per-gpu"),
    (["--max-tokens-per-gpu", "-1"], "must be >= 0"),
    (["--max-tokens-per-gpu", "64", "--context-parallel-size", "2"], "context-parallel-size > 1 is not supported"),
])
def test_bad_packing_flags_are_refused(flags, message):
    from megatron_a3po import config as C

    cfg, _ = C.parse_args(["--tiny-model", "qwen2", "--max-prompt-length", "16", "--max-response-length", "8",
                           *flags])
    with pytest.raises(C.ConfigError, match=message):
        C.validate(cfg, world_size=4)
