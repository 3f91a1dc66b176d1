"""Policy losses against hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_a3po.algorithms import AlgoContext, compute_policy_loss, get_policy_loss, kl_penalty
from megatron_a3po.algorithms.losses import PolicyLossConfig


def make_ctx(adv, log_ratio, logp=None, **kw):
    adv = torch.tensor([adv], dtype=torch.float32)
    log_ratio = torch.tensor([log_ratio], dtype=torch.float32)
    logp = (torch.tensor([logp], dtype=torch.float32) if logp is not None else torch.full_like(adv, -1.0))
    logp = logp.clone().requires_grad_()
    old = (logp.detach() - log_ratio)
    mask = torch.ones_like(adv, dtype=torch.bool)
    return AlgoContext(response_mask=mask, advantages=adv, logprobs=logp, old_logprobs=old, **kw), logp


def test_ppo_clip_hand_computed_values_and_gradients():
    ratios = [1.5, 0.5, 1.5, 5.0, 0.5, 1.1]
    ctx, logp = make_ctx([1, 1, -1, -1, -1, 1], [math.log(r) for r in ratios])
    loss, metrics = get_policy_loss("ppo_clip")(ctx)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5, 1.5, 3.0, 0.8, -1.1]]), rtol=0, atol=1e-6)
    loss.sum().backward()
    # d/dlogp (-A r) = -A r where not clipped; 0 on ratio-clipped and dual-clipped tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0, 0.0, -1.1]]), rtol=0, atol=1e-6)
    assert float(metrics["clipfrac"]) == pytest.approx(2 / 6)
    assert float(metrics["clipfrac_lower"]) == pytest.approx(1 / 6)
    # ratio 1.5 > 1.28 with A > 0 is clipped high; ratio 0.5 < 0.8 with A < 0 is clipped low
    assert float(metrics["clipfrac_high"]) == pytest.approx(1 / 6)
    assert float(metrics["clipfrac_low"]) == pytest.approx(1 / 6)
    assert [float(metrics[k]) for k in ("n_clipped_pos", "n_tokens_pos", "n_clipped_neg", "n_tokens_neg")] == \
        [1.0, 3.0, 1.0, 3.0]


def test_ppo_clip_dual_clip_off_and_custom_c():
    ctx, _ = make_ctx([-1, -1], [math.log(5.0), math.log(12.0)])
    no_dual, _ = get_policy_loss("ppo_clip")(ctx.replace(config={"dual_clip_c": None}))
    torch.testing.assert_close(no_dual, torch.tensor([[5.0, 12.0]]), rtol=1e-6, atol=1e-6)
    c10, _ = get_policy_loss("ppo_clip")(ctx.replace(config={"dual_clip_c": 10.0}))
    torch.testing.assert_close(c10, torch.tensor([[5.0, 10.0]]), rtol=1e-6, atol=1e-6)


def test_clip_cov_zeroes_gradient_of_random_candidates_only():
    # mean A = 0.4, mean logp = -2 → Cov = [1.6, -1.6, -2.4, 2.4, 0]: tokens 0 and 3 lie in (1, 5)
    adv = [2.0, 2.0, -2.0, -2.0, 2.0]
    logp = [-1.0, -3.0, -1.0, -3.0, -2.0]
    a = torch.tensor(adv)
    lp = torch.tensor(logp)
    cov = (a - a.mean()) * (lp - lp.mean())
    candidates = {i for i in range(5) if 1.0 < float(cov[i]) < 5.0}
    assert candidates == {0, 3}
    for ratio_r, n_zero in ((2e-4, 1), (0.5, 2)):
        ctx, logp_t = make_ctx(adv, [0.0] * 5, logp, generator=torch.Generator().manual_seed(0),
                               config={"clip_cov_ratio": ratio_r})
        loss, metrics = get_policy_loss("clip_cov")(ctx)
        loss.sum().backward()
        zeroed = {i for i in range(5) if float(logp_t.grad[0, i]) == 0.0}
        assert len(zeroed) == n_zero and zeroed <= candidates
        for i in set(range(5)) - zeroed:  # everything else is plain PPO at ratio 1: loss -A, grad -A
            assert float(loss.detach()[0, i]) == pytest.approx(-adv[i])
            assert float(logp_t.grad[0, i]) == pytest.approx(-adv[i])
        assert float(metrics["cov_clipfrac"]) == pytest.approx(n_zero / 5)


def test_clip_cov_skips_ratio_clipped_tokens():
    # token 0 has the in-range Cov but its ratio (1.5 with A > 0) is clipped by PPO → not a candidate
    ctx, logp_t = make_ctx([2.0, 2.0, -2.0, -2.0, 2.0], [math.log(1.5), 0, 0, 0, 0], [-1.0, -3.0, -1.0, -3.0, -2.0],
                           config={"clip_cov_ratio": 1.0})
    loss, _ = get_policy_loss("clip_cov")(ctx)
    loss.sum().backward()
    assert float(loss.detach()[0, 3]) == 0.0 and float(logp_t.grad[0, 3]) == 0.0
    assert float(loss.detach()[0, 0]) == pytest.approx(-2 * 1.28)  # ordinary clipped PPO loss stays


def test_kl_cov_penalises_top_cov_tokens():
    log_r = [0.1, 0.2, -0.3, 0.4]
    ctx, logp_t = make_ctx([2.0, 2.0, -2.0, -2.0], log_r, [-1.0, -3.0, -1.0, -3.0], config={"kl_cov_ratio": 0.25})
    loss, metrics = get_policy_loss("kl_cov")(ctx)
    # Cov = [2, -2, -2, 2]: k = 1, the tie between tokens 0 and 3 goes to the earliest (0)
    r = torch.exp(torch.tensor(log_r))
    expected = -torch.tensor([2.0, 2.0, -2.0, -2.0]) * r
    expected[0] += 1.0 * abs(log_r[0])
    torch.testing.assert_close(loss[0], expected, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    expected_grad = -torch.tensor([2.0, 2.0, -2.0, -2.0]) * r
    expected_grad[0] += 1.0  # d|log r|/dlogp = sign(log r) = +1
    torch.testing.assert_close(logp_t.grad[0], expected_grad, rtol=1e-6, atol=1e-6)
    assert float(metrics["kl_cov_frac"]) == pytest.approx(0.25)


def test_lp_reg_regularises_lowest_prob_negative_tokens_under_proxy():
    logp = [-5.0, -0.1, -6.0, -4.0, -3.0, -2.0]
    proxy = torch.tensor([[-1.0, -1.0, -5.0, float("-inf"), -1.0, -1.0]])
    ctx, logp_t = make_ctx([1, -1, -1, -1, -1, -1], [0.0] * 6, logp, proxy_logprobs=proxy,
                           config={"lp_reg_ratio": 0.4})
    loss, metrics = get_policy_loss("lp_reg")(ctx)
    # 5 negative tokens → k = 2 lowest log-probs: tokens 2 (-6) and 3 (-4); token 3's proxy is -inf → only 2
    expected = torch.tensor([-1.0, 1, 1, 1, 1, 1])
    expected[2] = 1.0 + (math.exp(1.0) - 1.0 - 1.0)  # -A r + k3: exp(proxy - logp) - (proxy - logp) - 1
    torch.testing.assert_close(loss[0], expected, rtol=1e-6, atol=1e-6)
    assert float(metrics["lp_reg_frac"]) == pytest.approx(1 / 6)
    loss.sum().backward()
    assert torch.isfinite(logp_t.grad).all()
    # d/dlogp [-A exp(logp - old)] = 1 at ratio 1 (A = -1), plus dk3/dlogp = 1 - exp(proxy - logp) = 1 - e
    assert float(logp_t.grad[0, 2]) == pytest.approx(1.0 + 1.0 - math.e, abs=1e-5)
    with pytest.raises(ValueError, match="proxy_logprobs"):
        get_policy_loss("lp_reg")(ctx.replace(proxy_logprobs=None))


def test_kl_penalty_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert float(kl_penalty(lp, ref, "k1")) == pytest.approx(1.0)
    assert float(kl_penalty(lp, ref, "abs")) == pytest.approx(1.0)
    assert float(kl_penalty(lp, ref, "k2")) == pytest.approx(0.5)
    assert float(kl_penalty(lp, ref, "k3")) == pytest.approx(math.exp(-1.0))
    assert float(kl_penalty(lp, ref, "low_var_kl")) == pytest.approx(math.exp(-1.0))
    assert float(kl_penalty(torch.tensor([0.0]), torch.tensor([-30.0]), "low_var_kl")) == 10.0  # clamped
    with pytest.raises(ValueError, match="kl_type"):
        kl_penalty(lp, ref, "k4")


def test_entropy_bonus_and_ref_kl_are_off_by_default_and_exact_when_on():
    ctx, _ = make_ctx([1.0, -1.0, 1.0], [0.0, 0.1, -0.1], [-1.0, -2.0, -0.5])
    ent = torch.tensor([[0.5, 1.0, 2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.4]])
    ctx = ctx.replace(entropy=ent, ref_logprobs=ref)
    pg, _ = get_policy_loss("ppo_clip")(ctx)
    base, _ = compute_policy_loss(ctx, "ppo_clip")
    torch.testing.assert_close(base, pg.mean())
    cfg = PolicyLossConfig(entropy_coef=0.01, kl_coef=0.1, kl_type="k1")
    loss, metrics = compute_policy_loss(ctx, "ppo_clip", loss_config=cfg)
    kl = ctx.logprobs.detach() - ref
    torch.testing.assert_close(loss, (pg - 0.01 * ent + 0.1 * kl).mean(), rtol=1e-6, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(ent.grad, torch.full((1, 3), -0.01 / 3))
    assert float(metrics["ref_kl"]) == pytest.approx(float(kl.mean()))
    with pytest.raises(ValueError, match="entropy"):
        compute_policy_loss(ctx.replace(entropy=None), "ppo_clip", loss_config=cfg)
    with pytest.raises(ValueError, match="entropy_grad"):
        compute_policy_loss(ctx.replace(entropy=ent.detach()), "ppo_clip", loss_config=cfg)


def test_compute_policy_loss_applies_microbatch_shaper():
    ctx, _ = make_ctx([1.0, 1.0, 1.0, 1.0], [0.0] * 4)
    ctx = ctx.replace(entropy=torch.tensor([[0.1, 0.9, 0.3, 0.2]]))
    loss, _ = compute_policy_loss(ctx, "ppo_clip", shaper="fork_tokens", shaper_config={"ratio": 0.25})
    # only token 1 is kept, with weight n_valid / k = 4: token-mean = (-1 * 4) / 4
    assert float(loss.detach()) == pytest.approx(-1.0)
    loss_step, _ = compute_policy_loss(ctx, "ppo_clip", shaper="a3po")  # step-level shaper: not applied here
    assert float(loss_step.detach()) == pytest.approx(-1.0)


@pytest.mark.parametrize("cfg, fragment", [
    ({"clip_ratio_low": 1.2}, "clip_ratio_low"),
    ({"dual_clip_c": 0.5}, "dual_clip_c"),
    ({"clip_cov_ratio": 0.0}, "clip_cov_ratio"),
    ({"kl_type": "kl"}, "kl_type"),
    ({"entropy_coeff": 0.1}, "unknown keys"),
])
def test_bad_loss_config_raises(cfg, fragment):
    ctx, _ = make_ctx([1.0], [0.0])
    with pytest.raises(ValueError, match=fragment):
        get_policy_loss("ppo_clip")(ctx.replace(config=cfg))


def test_missing_context_field_raises():
    ctx, _ = make_ctx([1.0], [0.0])
    with pytest.raises(ValueError, match="logprobs"):
        get_policy_loss("ppo_clip")(ctx.replace(logprobs=None))
