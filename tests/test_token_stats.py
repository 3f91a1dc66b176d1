"""What the shaper did to which tokens (token_stats) and the task's per-response labels (metrics.task_statistics):
each against a per-token Python loop over the same tensors, summed over two "ranks" through the real reduction."""

import math

import pytest
import torch

from megatron_a3po import metrics as M
from megatron_a3po import token_stats as T
from megatron_a3po.algorithms import a3po_token_weights
from megatron_a3po.experience import Experience
from megatron_a3po.rewards.registry import get_reward_fn


def _experience(seed: int, rows: int = 8, width: int = 12) -> Experience:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    seq = torch.tensor([1.5, -0.5, 0.0, 0.7, -1.2, 0.3, -0.9, 0.0])[:rows]
    old = torch.log(torch.rand(rows, width, generator=gen).clamp(min=1e-3))
    return Experience(tokens=torch.zeros(rows, width, dtype=torch.long), targets=torch.zeros(rows, width, dtype=torch.long),
                      response_mask=mask, loss_mask=mask, advantages=seq[:, None] * mask, seq_advantages=seq,
                      polarity=torch.sign(seq).to(torch.int8), rewards=(seq > 0).float(),
                      rollout_logprobs=old.clone(), old_logprobs=old)


def _reduce(parts: list[dict], shaper: str) -> dict:
    merged: dict = {}
    for part in parts:  # what reduce_statistics does with every rank's typed statistics
        for key, stat in part.items():
            M._merge(merged, key, stat)
    return {k: v.result() for k, v in merged.items()}


def test_selected_token_probabilities_and_push_per_polarity():
    exps = [_experience(1), _experience(2)]
    parts, expected = [], {"pos": [0, 0.0, 0.0], "neg": [0, 0.0, 0.0]}
    for exp in exps:
        weights = a3po_token_weights(exp.seq_advantages, exp.old_logprobs, exp.response_mask, step=3)
        parts.append(T.shaping_statistics(exp, weights, "a3po", step=3))
        for r in range(len(exp)):
            side = {1: "pos", -1: "neg"}.get(int(exp.polarity[r]))
            for t in range(exp.old_logprobs.shape[1]):
                if side and bool(exp.response_mask[r, t]) and float(weights[r, t]) != 1.0:
                    p = math.exp(float(exp.old_logprobs[r, t]))
                    expected[side][0] += 1
                    expected[side][1] += p
                    expected[side][2] += 1 - p
    got = _reduce(parts, "a3po")
    for side in ("pos", "neg"):
        count, prob_sum, push = expected[side]
        assert count > 0
        assert got[f"a3po/{side}_selected_prob_mean"] == pytest.approx(prob_sum / count, rel=1e-5)
        assert got[f"a3po/{side}_selected_one_minus_p_sum"] == pytest.approx(push, rel=1e-5)
    # A3PO picks low-probability tokens of positive responses and high-probability ones of negative responses
    assert got["a3po/pos_selected_prob_mean"] < got["a3po/neg_selected_prob_mean"]
    assert not any(k.startswith("tokprob/") for k in got)  # histograms: step 1 only


def test_step_one_histograms_count_every_token_once():
    exp = _experience(3)
    got = _reduce([T.shaping_statistics(exp, None, "shaper", step=1)], "shaper")
    assert not any(k.startswith("shaper/") for k in got)  # no step shaper, no selection statistics
    prob = exp.old_logprobs.exp()
    for series, sign in (("pos", 1), ("neg", -1)):
        counts = [got[T.histogram_key(series, i)] for i in range(T.HISTOGRAM_BINS)]
        values = [float(prob[r, t]) for r in range(len(exp)) for t in range(prob.shape[1])
                  if int(exp.polarity[r]) == sign and bool(exp.response_mask[r, t])]
        assert sum(counts) == len(values)
        for i, c in enumerate(counts):
            lo, hi = i / T.HISTOGRAM_BINS, (i + 1) / T.HISTOGRAM_BINS
            assert c == sum(lo <= v < hi or (i == T.HISTOGRAM_BINS - 1 and v == 1.0) for v in values), (series, i)
    # A3PO's selection: k_i = max(1, floor(0.2 L_i)) tokens of each positive / negative response
    lengths = exp.response_mask.sum(1)
    for series, sign in (("a3po_pos", 1), ("a3po_neg", -1)):
        k = sum(max(1, int(0.2 * int(n) + 1e-9)) for n, s in zip(lengths, exp.polarity) if int(s) == sign)
        assert sum(got[T.histogram_key(series, i)] for i in range(T.HISTOGRAM_BINS)) == k


def test_task_labels_give_shares_and_accuracy_per_label():
    reward = get_reward_fn("arithmetic")
    texts = ["85", "7+8=15,4+3+1=8;85", "7+8=15,4+3+1=8;84", "oops", "12"]
    labels = reward.labels(texts)
    assert reward.has_labels and labels == ["direct", "worked", "worked", "malformed", "direct"]
    correct = torch.tensor([reward(t, "85") > 0 for t in texts])
    got = M.task_statistics(labels, correct)
    assert got == {"task/direct_share": 0.4, "task/direct_accuracy": 0.5, "task/worked_share": 0.4,
                   "task/worked_accuracy": 0.5, "task/malformed_share": 0.2,
                   "task/malformed_accuracy": 0.0}
    assert M.task_statistics(None, correct) == {} and not get_reward_fn("math").has_labels
