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


def reference_grpo(rewards: list[float], n: int) -> list[float]:
    """The reference trainer's GRPO on the whole batch: (r - mean) / (unbiased std + 1e-6) per group of n."""
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g:g + n]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        out += [(r - mean) / (std + 1e-6) for r in group]
    return out


def test_psr_nsr_select_rows_by_correctness_as_the_reference_trainer_does():
    """verl fork of the paper (ray_trainer.py): GRPO advantages on the whole batch, then keep the correct rows
    (PSR) or the wrong ones (NSR), decided by the verifier. Groups: mixed, all correct, all wrong, mixed. The old
    selection by sign(A) kept the all-wrong group in PSR and the all-correct one in NSR (A = 0 rows in the
    token-mean denominator)."""
    verifier = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    penalty = [0.0, 0.0, -0.5, -1.0] + [0.0] * 12  # an overlong penalty: row 3 is correct but scores 0
    rewards = torch.tensor([v + p for v, p in zip(verifier, penalty)])
    correct = torch.tensor(verifier) > 0
    mask = torch.ones(16, 3, dtype=torch.bool)
    mask[5, 2] = mask[9, 1:] = False
    grpo = torch.tensor(reference_grpo(rewards.tolist(), 4), dtype=torch.float32)
    for name, keep in (("psr", correct), ("nsr", ~correct)):
        out = get_advantage_fn(name)(rewards, mask, 4, correct=correct)
        torch.testing.assert_close(out.seq_advantages, grpo, rtol=0, atol=1e-6)  # the whole batch's GRPO
        assert torch.equal(out.loss_mask, mask & keep[:, None]), name
        torch.testing.assert_close(out.token_advantages, torch.where(out.loss_mask, grpo[:, None], 0.0),
                                   rtol=0, atol=1e-6)
    psr = get_advantage_fn("psr")(rewards, mask, 4, correct=correct)
    assert torch.equal(psr.loss_mask[4:8], mask[4:8]) and not psr.loss_mask[8:12].any()  # all-correct in, all-wrong out
    assert bool(psr.loss_mask[3].all())  # correct despite its penalty (its reward is 0)
    # Without `correct` (a direct call) the rewards are taken as the verifier's: reward > 0
    direct = get_advantage_fn("nsr")(torch.tensor(verifier), mask, 4)
    assert torch.equal(direct.loss_mask, mask & ~correct[:, None])


def test_the_algorithm_hands_the_verifier_verdict_to_the_estimators_that_need_it():
    from megatron_a3po.rl_config import RLConfig, resolve_algorithm

    rewards, correct = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([True, False, True, False])
    mask = torch.ones(4, 2, dtype=torch.bool)
    for name in ("psr", "w_reinforce"):
        algorithm = resolve_algorithm(RLConfig(algorithm=name))
        assert "correct" in algorithm.needs
        out = algorithm.advantages(rewards, mask, 2, correct=correct)
        if name == "psr":
            assert out.loss_mask[:, 0].tolist() == [True, False, True, False]
        else:
            assert out.seq_advantages.tolist() == pytest.approx([0.1, -1.0, 0.1, -1.0])
    grpo = resolve_algorithm(RLConfig(algorithm="grpo"))  # does not take it
    assert "correct" not in grpo.needs and grpo.advantages(rewards, mask, 2, correct=correct).loss_mask.all()


def test_w_reinforce_hand_computed():
    fn = get_advantage_fn("w_reinforce")
    out = fn(torch.tensor([1.0, 0.0, 1.0]), MASK[:3], 3)
    torch.testing.assert_close(out.seq_advantages, torch.tensor([0.1, -1.0, 0.1]))
    out = fn(torch.tensor([1.0, -1.0]), MASK[:2], 2, {"w_reinforce_lambda": 0.5})  # {-1, +1} rewards (math_dapo)
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
