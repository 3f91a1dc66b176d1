"""A3PO, token_weighted and fork_tokens shapers against hand-computed cases and a naive per-row reference."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from megatron_a3po.algorithms import AlgoContext, get_advantage_fn, get_shaper, select_k_smallest
from megatron_a3po.algorithms.shaping import a3po_selection, a3po_token_weights, a3po_weight, fork_token_weights, token_weighted_weights


# ---------------------------------------------------------------- naive references (plain Python loops)

def naive_k(length: int, ratio: float) -> int:
    return max(1, math.floor(Fraction(str(ratio)) * length))


def naive_a3po(adv, old_lp, mask, step, ratio=0.2, rho_pos=2.0, alpha_pos=0.005, rho_neg=2.0, alpha_neg=0.005,
               metric="prob", entropy=None):
    """Per row: rank the valid tokens, take k; ties → earliest position. Scores in float64 Python."""
    B, T = mask.shape
    w = torch.ones(B, T, dtype=torch.float32)
    w_pos = max(rho_pos - alpha_pos * step, 1.0)
    w_neg = max(rho_neg - alpha_neg * step, 1.0)
    for i in range(B):
        a = float(adv[i])
        if a == 0:
            continue
        idx = [t for t in range(T) if bool(mask[i, t])]
        if not idx:
            continue
        k = naive_k(len(idx), ratio)
        if metric == "prob":
            score = [math.exp(float(old_lp[i, t])) for t in idx]
            # positive: lowest prob first; negative: highest prob first
            order = sorted(range(len(idx)), key=lambda j: (score[j] if a > 0 else -score[j], j))
        else:
            score = [float(entropy[i, t]) for t in idx]
            # positive: highest entropy first; negative: lowest entropy first
            order = sorted(range(len(idx)), key=lambda j: (-score[j] if a > 0 else score[j], j))
        for j in order[:k]:
            w[i, idx[j]] = w_pos if a > 0 else w_neg
    return w


def ragged_batch(seed, B=37, T=48, *, ties=False, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[:3] = torch.tensor([0, 1, T])
    pos = torch.arange(T)
    mask = (pos >= T - lengths[:, None]) if left_pad else (pos < lengths[:, None])
    logits = torch.randn(B, T, 11, generator=g) * 2
    old_lp = torch.log_softmax(logits, -1)[..., 0]
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    if ties:  # few distinct values: the tie rule decides
        old_lp = torch.round(old_lp * 2) / 2 - 0.25
        entropy = torch.round(entropy * 2) / 2
    old_lp = torch.where(mask, old_lp, torch.full_like(old_lp, float("nan")))  # padding may hold garbage
    adv = torch.randn(B, generator=g)
    adv[torch.randint(0, B, (6,), generator=g)] = 0.0
    return adv, old_lp, entropy, mask


# ---------------------------------------------------------------- A3PO: hand-computed

def test_a3po_hand_example():
    probs = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3])
    old_lp = torch.log(probs).repeat(3, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]] * 3, dtype=torch.bool)  # L = 5; last column is padding
    adv = torch.tensor([1.5, -0.5, 0.0])
    w = a3po_token_weights(adv, old_lp, mask, step=1, ratio=0.4)  # k = floor(0.4 * 5) = 2
    expected = torch.ones(3, 6)
    expected[0, [3, 1]] = 1.995  # positive: the two lowest probs 0.05, 0.1
    expected[1, [0, 4]] = 1.995  # negative: the two highest probs 0.9, 0.7
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)
    assert w.dtype == torch.float32


def test_a3po_k_is_at_least_one_and_entropy_metric():
    ent = torch.tensor([[0.3, 2.0, 0.1, 1.0], [0.3, 2.0, 0.1, 1.0]])
    old_lp = torch.zeros(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    w = a3po_token_weights(adv, old_lp, mask, step=100, ratio=0.2, metric="entropy", entropy=ent,
                           rho_pos=3.0, alpha_pos=0.01, rho_neg=2.5, alpha_neg=0.0)
    # floor(0.2 * 4) = 0 → k = 1; positive: highest entropy (col 1), negative: lowest entropy (col 2)
    expected = torch.ones(2, 4)
    expected[0, 1] = 2.0  # max(3 - 0.01 * 100, 1)
    expected[1, 2] = 2.5  # alpha_neg = 0 keeps rho_neg
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)


def test_a3po_decay_reaches_exactly_one():
    assert a3po_weight(1, 2.0, 0.005) == pytest.approx(1.995, abs=1e-12)
    assert a3po_weight(199, 2.0, 0.005) == pytest.approx(1.005, abs=1e-12)
    assert a3po_weight(200, 2.0, 0.005) == 1.0  # (rho - 1) / alpha = 200
    assert a3po_weight(201, 2.0, 0.005) == 1.0
    assert a3po_weight(100, 3.0, 0.02) == 1.0  # (3 - 1) / 0.02 = 100
    assert a3po_weight(99, 3.0, 0.02) == pytest.approx(1.02, abs=1e-12)
    assert a3po_weight(10_000, 2.0, 0.005, "static") == 2.0
    old_lp = torch.log(torch.tensor([[0.2, 0.8]]))
    w = a3po_token_weights(torch.tensor([1.0]), old_lp, torch.ones(1, 2, dtype=torch.bool), step=200, ratio=0.5)
    assert torch.equal(w, torch.ones(1, 2))  # selected but weight decayed to exactly 1
    w = a3po_token_weights(torch.tensor([1.0]), old_lp, torch.ones(1, 2, dtype=torch.bool), step=500, ratio=0.5,
                           schedule="static")
    assert torch.equal(w, torch.tensor([[2.0, 1.0]]))


@pytest.mark.parametrize("rewards", [
    [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # {0, 1}; second group all correct
    [1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0],  # {-1, +1}; second group all wrong
    [1.0, 0.7, 0.0, -0.3, 0.7, 0.7, 0.7, 0.7],  # overlong penalties; second group all equally penalised
])
def test_polarity_rule_for_reward_schemes(rewards):
    r = torch.tensor(rewards)
    mask = torch.ones(8, 10, dtype=torch.bool)
    out = get_advantage_fn("grpo")(r, mask, 4)
    first = r[:4]
    expected_pol = torch.sign(first - first.mean()).to(torch.int8)
    assert torch.equal(out.polarity[:4], expected_pol)
    assert torch.equal(out.polarity[4:], torch.zeros(4, dtype=torch.int8))  # A == 0 exactly
    assert torch.equal(out.seq_advantages[4:], torch.zeros(4))
    old_lp = torch.log_softmax(torch.randn(8, 10, 7, generator=torch.Generator().manual_seed(0)), -1)[..., 0]
    w = a3po_token_weights(out.seq_advantages, old_lp, mask, step=1)
    assert torch.equal(w[4:], torch.ones(4, 10))  # untouched
    for i in range(4):
        n_sel = int((w[i] != 1).sum())
        assert n_sel == (2 if expected_pol[i] != 0 else 0)  # k = floor(0.2 * 10)


# ---------------------------------------------------------------- A3PO: vectorised == naive per-row loop

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_a3po_matches_naive_reference(seed, ties):
    adv, old_lp, entropy, mask = ragged_batch(seed, ties=ties, left_pad=bool(seed % 2))
    ratio = [0.2, 0.37, 1.0, 0.05, 0.5, 0.2][seed]
    step = [1, 57, 150, 199, 200, 3][seed]
    kw = dict(ratio=ratio, rho_pos=2.0, alpha_pos=0.005, rho_neg=1.7, alpha_neg=0.002)
    for metric in ("prob", "entropy"):
        got = a3po_token_weights(adv, old_lp, mask, step, metric=metric, entropy=entropy, **kw)
        want = naive_a3po(adv, old_lp, mask, step, metric=metric, entropy=entropy, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_a3po_selection_matches_naive_with_small_chunks():
    """The length-bucketed chunking must not change results (force many tiny chunks)."""
    adv, old_lp, _, mask = ragged_batch(11, B=64, T=40, ties=True)
    key = torch.where((adv > 0)[:, None], old_lp, -old_lp)
    k = torch.tensor([naive_k(int(L), 0.3) if (L > 0 and a != 0) else 0 for L, a in zip(mask.sum(1), adv)])
    full = select_k_smallest(key, mask, k)
    tiny = select_k_smallest(key, mask, k, chunk_elems=7)
    assert torch.equal(full, tiny)
    want = naive_a3po(adv, old_lp, mask, 1, ratio=0.3) != 1
    assert torch.equal(full, want)


def test_a3po_invariant_to_padding_and_batch_composition():
    adv, old_lp, entropy, mask = ragged_batch(3, B=20, T=30, ties=True)
    base = a3po_token_weights(adv, old_lp, mask, 5)
    # Left-pad the same responses into a wider tensor.
    T2 = 45
    lp2 = torch.full((20, T2), -3.0)
    m2 = torch.zeros(20, T2, dtype=torch.bool)
    for i in range(20):
        vals = old_lp[i][mask[i]]
        lp2[i, T2 - len(vals):] = vals
        m2[i, T2 - len(vals):] = True
    wide = a3po_token_weights(adv, lp2, m2, 5)
    for i in range(20):
        assert torch.equal(base[i][mask[i]], wide[i][m2[i]])
    # A different batch: a permuted subset plus unrelated rows.
    idx = torch.tensor([7, 2, 19, 0, 11])
    other_adv, other_lp, _, other_mask = ragged_batch(99, B=9, T=30)
    sub = a3po_token_weights(torch.cat([adv[idx], other_adv]), torch.cat([old_lp[idx], other_lp]),
                             torch.cat([mask[idx], other_mask]), 5)
    assert torch.equal(sub[:5], base[idx])


def test_a3po_selection_masks_are_disjoint_and_sized():
    adv, old_lp, _, mask = ragged_batch(5)
    pos, neg = a3po_selection(adv, old_lp, mask, ratio=0.25)
    assert not (pos & neg).any() and not (pos & ~mask).any() and not (neg & ~mask).any()
    for i in range(adv.shape[0]):
        L = int(mask[i].sum())
        expect = naive_k(L, 0.25) if (L > 0 and adv[i] != 0) else 0
        assert int(pos[i].sum() + neg[i].sum()) == expect


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ratio=0.0), "ratio"),
    (dict(ratio=1.5), "ratio"),
    (dict(metric="entropy"), "entropy"),
    (dict(metric="perplexity"), "metric"),
    (dict(rho_pos=0.0), "rho_pos"),
    (dict(alpha_neg=-1.0), "alpha_neg"),
    (dict(schedule="cosine"), "schedule"),
])
def test_a3po_bad_arguments_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        a3po_token_weights(torch.ones(2), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1, **kwargs)


def test_a3po_shape_and_step_errors():
    with pytest.raises(ValueError, match="old_logprobs"):
        a3po_token_weights(torch.ones(2), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="seq_advantages"):
        a3po_token_weights(torch.ones(3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="step"):
        a3po_token_weights(torch.ones(2), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="non-finite"):
        a3po_token_weights(torch.ones(1), torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2, dtype=torch.bool), 1)


def test_a3po_registry_shaper_uses_context():
    adv, old_lp, entropy, mask = ragged_batch(8)
    ctx = AlgoContext(response_mask=mask, seq_advantages=adv, old_logprobs=old_lp, old_entropy=entropy, step=40,
                      config={"ratio": 0.3, "metric": "entropy"})
    shaper = get_shaper("a3po")
    assert shaper.phase == "step"
    want = naive_a3po(adv, old_lp, mask, 40, ratio=0.3, metric="entropy", entropy=entropy)
    torch.testing.assert_close(shaper(ctx), want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="unknown keys"):
        shaper(ctx.replace(config={"ratioo": 0.3}))


# ---------------------------------------------------------------- token_weighted (static ablation grid)

@pytest.mark.parametrize("polarity, end, row, cols", [
    ("pos", "low", 0, [3, 1]), ("pos", "high", 0, [0, 4]), ("neg", "low", 1, [3, 1]), ("neg", "high", 1, [0, 4]),
])
def test_token_weighted_grid_hand_example(polarity, end, row, cols):
    probs = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3])
    old_lp = torch.log(probs).repeat(3, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]] * 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.0])
    ctx = AlgoContext(response_mask=mask, seq_advantages=adv, old_logprobs=old_lp,
                      config=dict(metric="prob", polarity=polarity, end=end, ratio=0.4, scale=0.5))
    w = get_shaper("token_weighted")(ctx)
    expected = torch.ones(3, 6)
    expected[row, cols] = 0.5
    assert torch.equal(w, expected)


def test_token_weighted_entropy_metric_and_errors():
    ent = torch.tensor([[0.3, 2.0, 0.1, 1.0]])
    w = token_weighted_weights(torch.tensor([1.0]), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool),
                               metric="entropy", polarity="pos", end="high", ratio=0.5, scale=3.0, entropy=ent)
    assert torch.equal(w, torch.tensor([[1.0, 3.0, 1.0, 3.0]]))
    with pytest.raises(ValueError, match="entropy"):
        token_weighted_weights(torch.ones(1), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), metric="entropy")
    with pytest.raises(ValueError, match="end"):
        token_weighted_weights(torch.ones(1), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), end="middle")


# ---------------------------------------------------------------- fork_tokens (80/20)

def test_fork_tokens_hand_example():
    ent = torch.tensor([[0.1, 3.0, 0.2, 9.0], [2.5, 0.3, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # 7 valid; col 3 of row 0 is padding
    # k = max(1, floor(0.3 * 7)) = 2: entropies 5.0 and 3.0 (9.0 is padding)
    w_sel = fork_token_weights(ent, mask, ratio=0.3, normalise="selected")
    w_all = fork_token_weights(ent, mask, ratio=0.3, normalise="all")
    assert torch.equal(w_sel, torch.tensor([[0.0, 3.5, 0.0, 1.0], [0.0, 0.0, 3.5, 0.0]]))
    assert torch.equal(w_all, torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]))
    assert float(w_sel[mask].sum()) == 7.0  # "selected": weights sum to n_valid → mean over kept tokens
    ctx = AlgoContext(response_mask=mask, entropy=ent.requires_grad_(), config={"ratio": 0.3})
    shaper = get_shaper("fork_tokens")
    assert shaper.phase == "microbatch"
    assert torch.equal(shaper(ctx), w_sel)
    with pytest.raises(ValueError, match="entropy"):
        shaper(AlgoContext(response_mask=mask))


def test_fork_tokens_matches_naive_flattened_topk():
    g = torch.Generator().manual_seed(4)
    ent = torch.round(torch.rand(9, 13, generator=g) * 8) / 8  # ties
    mask = torch.rand(9, 13, generator=g) > 0.3
    w = fork_token_weights(ent, mask, ratio=0.2, normalise="all")
    flat = [(float(ent[i, j]), i * 13 + j) for i in range(9) for j in range(13) if mask[i, j]]
    k = naive_k(len(flat), 0.2)
    keep = {pos for _, pos in sorted(flat, key=lambda v: (-v[0], v[1]))[:k]}
    want = torch.ones(9, 13)
    for i in range(9):
        for j in range(13):
            if mask[i, j]:
                want[i, j] = 1.0 if i * 13 + j in keep else 0.0
    assert torch.equal(w, want)


def test_selection_kernel_errors_and_exact_floor():
    from megatron_a3po.algorithms import k_from_ratio

    assert k_from_ratio(torch.tensor([0, 1, 4, 5, 15, 100]), 0.2).tolist() == [0, 1, 1, 1, 3, 20]
    assert k_from_ratio(torch.tensor([100]), 0.29).tolist() == [29]  # 0.29 * 100 is 28.999... in float64
    key = torch.tensor([[0.3, 0.1, 0.2]])
    valid = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="k must not exceed"):
        select_k_smallest(key, valid, torch.tensor([3]))
    with pytest.raises(ValueError, match="non-finite"):
        select_k_smallest(torch.tensor([[float("inf"), 0.1, 0.2]]), valid, torch.tensor([1]), name="old_logprobs")
    assert select_k_smallest(key, valid, torch.tensor([1])).tolist() == [[False, True, False]]


def test_context_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="old_logprobs"):
        AlgoContext(response_mask=torch.ones(2, 3, dtype=torch.bool), old_logprobs=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="seq_advantages"):
        AlgoContext(response_mask=torch.ones(2, 3, dtype=torch.bool), seq_advantages=torch.zeros(3))
