"""Outcome advantage estimators: hand-computed values, a per-group loop reference, polarity, errors."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_a3po.algorithms import get_advantage_fn

MASK = torch.tensor([[1, 1, 1, 0]] * 8, dtype=torch.bool)
R = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])


def test_grpo_hand_computed():
    out = get_advantage_fn("grpo")(R, MASK, 4)
    # group 1: mean .25, unbiased std sqrt((.75^2 + 3 * .25^2) / 3) = .5; group 2: mean .75, std .5
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25]) / (0.5 + 1e-6)
    torch.testing.assert_close(out.seq_advantages, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.token_advantages, expected[:, None] * MASK.float(), rtol=0, atol=1e-6)
    assert torch.equal(out.polarity, torch.tensor([1, -1, -1, -1, 1, 1, -1, 1], dtype=torch.int8))
    assert torch.equal(out.loss_mask, MASK)


def test_dr_grpo_hand_computed():
    out = get_advantage_fn("dr_grpo")(R, MASK, 4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])
    torch.testing.assert_close(out.seq_advantages, expected, rtol=0, atol=1e-7)


def test_psr_nsr_drop_the_other_polarity():
    grpo = get_advantage_fn("grpo")(R, MASK, 4)
    psr = get_advantage_fn("psr")(R, MASK, 4)
    nsr = get_advantage_fn("nsr")(R, MASK, 4)
    pos = grpo.seq_advantages > 0
    torch.testing.assert_close(psr.seq_advantages, grpo.seq_advantages)  # GRPO advantages kept
    assert torch.equal(psr.loss_mask, MASK & pos[:, None])
    assert torch.equal(nsr.loss_mask, MASK & ~pos[:, None])
    assert torch.equal(psr.token_advantages, torch.where(psr.loss_mask, grpo.token_advantages, 0.0))
    assert (nsr.token_advantages <= 0).all() and (psr.token_advantages >= 0).all()


def test_w_reinforce_hand_computed():
    fn = get_advantage_fn("w_reinforce")
    out = fn(torch.tensor([1.0, 0.0, 1.0]), MASK[:3], 3)
    torch.testing.assert_close(out.seq_advantages, torch.tensor([0.1, -1.0, 0.1]))
    out = fn(torch.tensor([1.0, -1.0]), MASK[:2], 2, {"w_reinforce_lambda": 0.5})  # {-1, +1} rewards
    torch.testing.assert_close(out.seq_advantages, torch.tensor([0.5, -1.0]))
    assert torch.equal(out.polarity, torch.tensor([1, -1], dtype=torch.int8))


def test_polarity_weights_scale_each_side():
    base = get_advantage_fn("grpo")(R, MASK, 4).seq_advantages
    out = get_advantage_fn("polarity_weighted")(R, MASK, 4, {"pos_weight": 0.25, "neg_weight": 2.0})
    expected = torch.where(base > 0, base * 0.25, base * 2.0)
    torch.testing.assert_close(out.seq_advantages, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_grpo_matches_per_group_loop_with_arbitrary_group_ids(seed):
    g = torch.Generator().manual_seed(seed)
    B = 30
    ids = torch.randint(100, 108, (B,), generator=g)  # arbitrary, non-contiguous ids; some groups size 1
    rewards = torch.randint(0, 3, (B,), generator=g).float() - 0.3 * torch.randint(0, 2, (B,), generator=g).float()
    mask = torch.ones(B, 5, dtype=torch.bool)
    out = get_advantage_fn("grpo")(rewards, mask, ids)
    for i in range(B):
        members = [float(rewards[j]) for j in range(B) if ids[j] == ids[i]]
        if len(members) == 1:
            want = 0.0
        else:
            want = (float(rewards[i]) - statistics.fmean(members)) / (statistics.stdev(members) + 1e-6)
        assert float(out.seq_advantages[i]) == pytest.approx(want, abs=1e-5)
        assert int(out.polarity[i]) == (0 if want == 0 else (1 if want > 0 else -1))


def test_contiguous_groups_equal_explicit_ids():
    a = get_advantage_fn("grpo")(R, MASK, 4)
    b = get_advantage_fn("grpo")(R, MASK, torch.tensor([5, 5, 5, 5, 2, 2, 2, 2]))
    assert torch.equal(a.seq_advantages, b.seq_advantages)


@pytest.mark.parametrize("call, fragment", [
    (lambda f: f(R, MASK, 3), "groups"),
    (lambda f: f(R, MASK, torch.zeros(5, dtype=torch.long)), "groups"),
    (lambda f: f(R[:5], MASK, 1), "rewards"),
    (lambda f: f(R, MASK, 4, {"eps": 1.0}), "unknown keys"),
    (lambda f: f(torch.tensor([float("nan")] * 8), MASK, 4), "rewards"),
    (lambda f: f(R, MASK, 4, {"neg_weight": -1.0}), "neg_weight"),
])
def test_bad_inputs_raise(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call(get_advantage_fn("grpo"))
