"""rloo, reinforce_plus_plus_baseline (advantages) and gspo (policy loss) against independent computations.

The expected values are built here from the definitions (verl's core_algos: compute_rloo_outcome_advantage,
compute_reinforce_plus_plus_baseline_outcome_advantage, compute_policy_loss_gspo), with Python loops or plain torch,
never by calling the implementation. Outputs are float32: atol 1e-6 unless said otherwise.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_a3po.algorithms import AlgoContext, aggregate, bind, declaration, get_advantage_fn, get_policy_loss

ATOL = 1e-6


# ---------------------------------------------------------------- data


def batch(seed: int, groups: int = 5, n: int = 4, T: int = 7):
    """Random rewards (0/1 verdicts plus overlong-style penalties) with an all-correct, an all-wrong and an
    all-equally-penalised group, and variable-length masks (one row of length 0, one with a hole)."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    rewards = (torch.rand(B, generator=g) < 0.5).float() - 0.5 * torch.rand(B, generator=g) * (torch.rand(B, generator=g) < 0.3)
    rewards[0:n] = 1.0
    rewards[n:2 * n] = 0.0
    rewards[2 * n:3 * n] = -0.3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[5] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[7, 0] = False  # a hole: left padding
    return rewards, mask


def shuffled_ids(seed: int, groups: int = 5, n: int = 4):
    """A tensor of arbitrary group ids in shuffled order, plus a singleton group (id 99)."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.arange(groups * n) // n) * 7 + 3
    ids = torch.cat([ids, torch.tensor([99])])
    return ids[torch.randperm(ids.numel(), generator=g)]


def members(ids: list) -> dict:
    out: dict = {}
    for i, gid in enumerate(ids):
        out.setdefault(gid, []).append(i)
    return out


# ---------------------------------------------------------------- references (loops over Python floats)


def reference_rloo(rewards: list[float], ids: list) -> list[float]:
    """verl: A_i = s_i * n / (n - 1) - mean * n / (n - 1), i.e. s_i minus the mean of the others; n == 1: A = s."""
    adv = [0.0] * len(rewards)
    for rows in members(ids).values():
        for i in rows:
            others = [rewards[j] for j in rows if j != i]
            adv[i] = rewards[i] - statistics.fmean(others) if others else rewards[i]
    return adv


def reference_rpp(rewards: list[float], ids: list, lengths: list[int]) -> list[float]:
    """verl: d = s - group mean (singleton: mean 0), tiled over the valid tokens, whitened over all valid tokens
    (unbiased variance, rsqrt(var + 1e-8), mean not added back)."""
    d = [0.0] * len(rewards)
    for rows in members(ids).values():
        mean = statistics.fmean(rewards[j] for j in rows) if len(rows) > 1 else 0.0
        for i in rows:
            d[i] = rewards[i] - mean
    tokens = [d[i] for i in range(len(d)) for _ in range(lengths[i])]
    mu = sum(tokens) / len(tokens)
    var = sum((x - mu) ** 2 for x in tokens) / (len(tokens) - 1)
    return [(x - mu) / math.sqrt(var + 1e-8) for x in d]


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_whiten(values, mask, shift_mean=True) transliterated (float32 tensors)."""
    m = mask.float()
    mean = (values * m).sum() / m.sum()
    var = (((values - mean) ** 2) * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def check_output(out, seq: list[float], mask: torch.Tensor):
    expected = torch.tensor(seq, dtype=torch.float32)
    torch.testing.assert_close(out.seq_advantages, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.token_advantages, torch.where(mask, expected[:, None], 0.0), rtol=0, atol=ATOL)
    assert out.seq_advantages.dtype == out.token_advantages.dtype == torch.float32
    assert torch.equal(out.polarity, torch.sign(out.seq_advantages).to(torch.int8))
    assert torch.equal(out.loss_mask, mask)


# ---------------------------------------------------------------- rloo


def test_rloo_hand_computed():
    out = get_advantage_fn("rloo")(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
                                   torch.ones(8, 2, dtype=torch.bool), 4)
    # group 1: 1 - 0 = 1, 0 - 1/3; group 2: 1 - 2/3, 0 - 1
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -1.0, 1 / 3])
    torch.testing.assert_close(out.seq_advantages, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_the_loop_reference_contiguous_groups(seed):
    rewards, mask = batch(seed)
    out = get_advantage_fn("rloo")(rewards, mask, 4)
    check_output(out, reference_rloo(rewards.tolist(), [i // 4 for i in range(20)]), mask)
    assert out.seq_advantages[:12].eq(0).all() and out.polarity[:12].eq(0).all()  # all-equal groups: exactly 0


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_tensor_group_ids_shuffled_with_a_singleton(seed):
    ids = shuffled_ids(seed)
    rewards, mask = batch(seed + 10, groups=5, n=4)
    rewards, mask = torch.cat([rewards, torch.tensor([0.0])]), torch.cat([mask, torch.ones(1, 7, dtype=torch.bool)])
    singleton = int((ids == 99).nonzero())
    rewards[singleton] = 0.7
    out = get_advantage_fn("rloo")(rewards, mask, ids)
    check_output(out, reference_rloo(rewards.tolist(), ids.tolist()), mask)
    assert float(out.seq_advantages[singleton]) == pytest.approx(0.7, abs=ATOL)  # a group of one keeps A = s


# ---------------------------------------------------------------- reinforce_plus_plus_baseline


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpp_baseline_matches_the_loop_reference_and_verl_whitening(seed):
    rewards, mask = batch(seed)
    out = get_advantage_fn("reinforce_plus_plus_baseline")(rewards, mask, 4)
    ids = [i // 4 for i in range(20)]
    check_output(out, reference_rpp(rewards.tolist(), ids, mask.sum(1).tolist()), mask)
    # and verl's own order of operations on the [B, T] tile, in float32
    d = rewards - rewards.view(5, 4).mean(1).repeat_interleave(4)
    verl = verl_masked_whiten(d[:, None] * mask.float(), mask) * mask.float()
    torch.testing.assert_close(out.token_advantages, verl, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rpp_baseline_tensor_group_ids_shuffled_with_a_singleton(seed):
    ids = shuffled_ids(seed)
    rewards, mask = batch(seed + 20, groups=5, n=4)
    rewards, mask = torch.cat([rewards, torch.tensor([0.7])]), torch.cat([mask, torch.ones(1, 7, dtype=torch.bool)])
    out = get_advantage_fn("reinforce_plus_plus_baseline")(rewards, mask, ids)
    check_output(out, reference_rpp(rewards.tolist(), ids.tolist(), mask.sum(1).tolist()), mask)


def test_rpp_baseline_whitening_moves_all_equal_groups_off_zero():
    """Documented behaviour (as in verl): the batch whitening subtracts the token mean, so with unequal lengths
    an all-equal group's A = -mu / sigma is not 0 and its polarity is not 0."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # group 1 mixed, group 2 all correct
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = get_advantage_fn("reinforce_plus_plus_baseline")(rewards, mask, 2)
    # d = [.5, -.5, 0, 0] over 4 + 1 + 2 + 2 tokens: mu = 1.5 / 9 > 0 → the all-correct group gets A < 0
    check_output(out, reference_rpp(rewards.tolist(), [0, 0, 1, 1], [4, 1, 2, 2]), mask)
    assert out.polarity[2:].tolist() == [-1, -1]


def test_rpp_baseline_needs_two_valid_tokens():
    fn = get_advantage_fn("reinforce_plus_plus_baseline")
    one = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.tensor([1.0, 0.0]), one, 2)
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.tensor([1.0, 0.0]), torch.zeros(2, 2, dtype=torch.bool), 2)


@pytest.mark.parametrize("name", ["rloo", "reinforce_plus_plus_baseline"])
def test_estimators_declare_no_settings_and_a_group_baseline(name):
    fn = get_advantage_fn(name)
    assert declaration(fn).group_baseline and declaration(fn).reads == ()
    bind("advantage", name, fn, {})
    with pytest.raises(ValueError, match="does not read epsilon"):
        bind("advantage", name, fn, {"epsilon": 1e-3})


# ---------------------------------------------------------------- gspo


def gspo_ctx(adv, logp, old, mask, config=None):
    logp = torch.tensor(logp, dtype=torch.float32).requires_grad_()
    ctx = AlgoContext(response_mask=torch.tensor(mask, dtype=torch.bool), advantages=torch.tensor(adv),
                      logprobs=logp, old_logprobs=torch.tensor(old), config=config)
    return ctx, logp


def reference_gspo(adv, logp, old, mask, low, high):
    """Loops over Python floats: s_i = exp(min(mean over valid tokens of (logp - old), 10)); per valid token
    loss = max(-A s, -A clip(s)); gradient of sum(loss) w.r.t. logp_t = -A s_i unless clipped (or the
    sequence's log-ratio is capped at 10), else 0."""
    B, T = len(mask), len(mask[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    clipped = [[False] * T for _ in range(B)]
    for i in range(B):
        valid = [t for t in range(T) if mask[i][t]]
        mean = sum(logp[i][t] - old[i][t] for t in valid) / max(len(valid), 1)
        s = math.exp(min(mean, 10.0))
        for t in valid:
            a = adv[i][t]
            unclipped, cut = -a * s, -a * min(max(s, 1 - low), 1 + high)
            loss[i][t] = max(unclipped, cut)
            clipped[i][t] = cut > unclipped
            grad[i][t] = 0.0 if clipped[i][t] or mean > 10.0 else -a * s
    return loss, grad, clipped


def random_gspo_inputs(seed: int, B: int = 6, T: int = 5, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).tolist()
    logp = (-torch.rand(B, T, generator=g) * 3).tolist()
    old = [[lp - float(scale * torch.randn((), generator=g)) for lp in row] for row in logp]
    sign = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0)
    adv = (sign[:, None] * (0.5 + torch.rand(B, 1, generator=g)) * torch.ones(B, T)).tolist()
    return adv, logp, old, mask


@pytest.mark.parametrize("seed, low, high", [(0, 3e-4, 4e-4), (1, 0.2, 0.28), (2, 0.05, 0.1), (3, 3e-4, 4e-4)])
def test_gspo_values_gradients_and_counts_match_the_loop_reference(seed, low, high):
    adv, logp, old, mask = random_gspo_inputs(seed)
    ctx, logp_t = gspo_ctx(adv, logp, old, mask, {"clip_ratio_low": low, "clip_ratio_high": high})
    loss, metrics = get_policy_loss("gspo")(ctx)
    exp_loss, exp_grad, clipped = reference_gspo(adv, logp, old, mask, low, high)
    m = ctx.response_mask
    torch.testing.assert_close(torch.where(m, loss, 0.0), torch.tensor(exp_loss), rtol=0, atol=ATOL)
    torch.where(m, loss, 0.0).sum().backward()
    torch.testing.assert_close(logp_t.grad, torch.tensor(exp_grad), rtol=0, atol=ATOL)
    cut = torch.tensor(clipped)
    a = torch.tensor(adv)
    assert float(metrics["clipfrac"]) == pytest.approx(float(cut.sum()) / float(m.sum()))
    for name, side in (("pos", a > 0), ("neg", a < 0)):
        assert float(metrics[f"n_clipped_{name}"]) == float((cut & side & m).sum())
        assert float(metrics[f"n_tokens_{name}"]) == float((side & m).sum())
    kl = sum(o - lp for lr, orow, mrow in zip(logp, old, mask) for lp, o, v in zip(lr, orow, mrow) if v)
    assert float(metrics["ppo_kl"]) == pytest.approx(kl / float(m.sum()), abs=1e-6)  # token-mean of -(logp - old)


def test_gspo_gradient_equals_the_sequence_level_objective():
    """With seq-mean-token-mean, the token form's gradient is that of GSPO's sequence objective
    mean_i max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean_t log r), differentiated by autograd."""
    adv, logp, old, mask = random_gspo_inputs(4, scale=0.05)
    cfg = {"clip_ratio_low": 0.02, "clip_ratio_high": 0.03}
    ctx, logp_t = gspo_ctx(adv, logp, old, mask, cfg)
    loss, _ = get_policy_loss("gspo")(ctx)
    aggregate(loss, ctx.response_mask, "seq-mean-token-mean").backward()

    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.float64)
    s = torch.exp(((lp - torch.tensor(old, dtype=torch.float64)) * m).sum(1) / m.sum(1))
    a = torch.tensor(adv, dtype=torch.float64)[:, 0]
    objective = torch.maximum(-a * s, -a * s.clamp(1 - 0.02, 1 + 0.03)).mean()
    objective.backward()
    assert 0 < int((s > 1.03).sum() + (s < 0.98).sum()) < len(mask)  # some sequences clipped, some not
    torch.testing.assert_close(logp_t.grad.double(), lp.grad, rtol=0, atol=1e-6)


def test_gspo_clips_both_sides_without_dual_clip():
    """Four one-row sequences (mean log-ratio per row), clip 0.1 / 0.2: A > 0 above 1 + high → clipped;
    A > 0 below 1 - low → not; A < 0 below 1 - low → clipped; A < 0 far above 1 + high → not (no dual clip)."""
    log_s = [math.log(1.5), math.log(0.5), math.log(0.5), math.log(5.0)]
    adv = [[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]]
    old = [[-1.0, -1.0]] * 4
    logp = [[-1.0 + ls - 0.1, -1.0 + ls + 0.1] for ls in log_s]  # per-token log-ratios differ, mean is log s
    ctx, logp_t = gspo_ctx(adv, logp, old, [[True, True]] * 4, {"clip_ratio_low": 0.1, "clip_ratio_high": 0.2})
    loss, metrics = get_policy_loss("gspo")(ctx)
    torch.testing.assert_close(loss, torch.tensor([[-1.2] * 2, [-0.5] * 2, [0.9] * 2, [5.0] * 2]), rtol=0, atol=1e-5)
    loss.sum().backward()
    torch.testing.assert_close(logp_t.grad, torch.tensor([[0.0] * 2, [-0.5] * 2, [0.0] * 2, [5.0] * 2]),
                               rtol=0, atol=1e-5)
    assert [float(metrics[k]) for k in ("n_clipped_pos", "n_tokens_pos", "n_clipped_neg", "n_tokens_neg")] == \
        [2.0, 4.0, 2.0, 4.0]
    assert float(metrics["clipfrac"]) == pytest.approx(0.5)
    assert float(metrics["ratio_mean"]) == pytest.approx((1.5 + 0.5 + 0.5 + 5.0) / 4, rel=1e-6)


def test_gspo_caps_the_sequence_log_ratio_at_10():
    ctx, logp_t = gspo_ctx([[-1.0, -1.0]], [[-1.0, -1.0]], [[-13.0, -13.0]], [[True, True]])  # mean log r = 12
    loss, _ = get_policy_loss("gspo")(ctx)
    torch.testing.assert_close(loss, torch.full((1, 2), math.exp(10.0)), rtol=1e-6, atol=0)
    loss.sum().backward()
    assert logp_t.grad.eq(0).all()  # the clamp stops the gradient, as verl's torch.clamp(max=10) does


def test_gspo_padding_and_masked_rows_do_not_enter_the_sequence_ratio():
    nan_pad = [[-1.0, -1.0, float("nan")], [-2.0, float("inf"), 0.0]]
    ctx, _ = gspo_ctx([[1.0] * 3, [1.0] * 3], [[-0.9, -1.1, 0.0], [-2.0, 0.0, 0.0]], nan_pad,
                      [[True, True, False], [True, False, False]])
    loss, metrics = get_policy_loss("gspo")(ctx)
    # row 0: mean log r = (0.1 - 0.1) / 2 = 0 → s = 1, loss -1; row 1: log r = 0 → -1
    torch.testing.assert_close(torch.where(ctx.mask, loss, 0.0),
                               torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]), rtol=0, atol=ATOL)
    assert all(math.isfinite(float(v)) for v in metrics.values())


def test_gspo_equals_ppo_clip_when_every_sequence_has_one_token():
    g = torch.Generator().manual_seed(5)
    adv = (torch.randn(16, 1, generator=g)).tolist()
    logp = (-torch.rand(16, 1, generator=g) * 2).tolist()
    old = [[lp - float(0.4 * torch.randn((), generator=g))] for (lp,) in logp]
    clip = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
    results = []
    for name, cfg in (("gspo", clip), ("ppo_clip", {**clip, "dual_clip_c": None})):
        ctx, logp_t = gspo_ctx(adv, logp, old, [[True]] * 16, cfg)
        loss, metrics = get_policy_loss(name)(ctx)
        loss.sum().backward()
        results.append((loss.detach(), logp_t.grad, metrics))
    (g_loss, g_grad, g_m), (p_loss, p_grad, p_m) = results
    assert 0 < float(p_m["clipfrac"]) < 1
    torch.testing.assert_close(g_loss, p_loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(g_grad, p_grad, rtol=0, atol=ATOL)
    for key in ("clipfrac", "n_clipped_pos", "n_tokens_pos", "n_clipped_neg", "n_tokens_neg", "ppo_kl", "ratio_mean"):
        assert float(g_m[key]) == pytest.approx(float(p_m[key]), abs=1e-6), key


@pytest.mark.parametrize("cfg, fragment", [
    ({"clip_ratio_low": 1.0}, "clip_ratio_low"),
    ({"clip_ratio_low": -0.1}, "clip_ratio_low"),
    ({"clip_ratio_high": -1e-4}, "clip_ratio_high"),
    ({"dual_clip_c": 3.0}, "unknown keys"),
])
def test_gspo_bad_settings_raise(cfg, fragment):
    ctx, _ = gspo_ctx([[1.0]], [[-1.0]], [[-1.0]], [[True]], cfg)
    with pytest.raises(ValueError, match=fragment):
        get_policy_loss("gspo")(ctx)


def test_gspo_preset_resolves_to_its_clip_range_and_aggregation():
    from megatron_a3po.algorithms.losses import GSPOConfig
    from megatron_a3po.rl_config import RLConfig, resolve_algorithm

    algorithm = resolve_algorithm(RLConfig(algorithm="gspo"))
    assert algorithm.loss.name == "gspo" and algorithm.advantage.name == "grpo"
    assert isinstance(algorithm.loss.settings, GSPOConfig)
    assert (algorithm.loss.settings.clip_ratio_low, algorithm.loss.settings.clip_ratio_high) == (3e-4, 4e-4)
    assert algorithm.aggregation == "seq-mean-token-mean" == algorithm.loss.declared.aggregation
    # the trainer's path (Algorithm.micro_batch_loss → compute_policy_loss) applies that clip range
    adv, logp, old, mask = random_gspo_inputs(6, scale=0.01)
    ctx, _ = gspo_ctx(adv, logp, old, mask)
    loss, _ = algorithm.micro_batch_loss(ctx)
    exp_loss, _, clipped = reference_gspo(adv, logp, old, mask, 3e-4, 4e-4)
    assert any(any(row) for row in clipped)
    lengths = [sum(row) for row in mask]
    expected = sum(sum(row) / n for row, n in zip(exp_loss, lengths)) / len(mask)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name, advantage, loss, clip, agg", [
    ("rloo", "rloo", "ppo_clip", (0.2, 0.28), "token-mean"),
    ("reinforce_plus_plus_baseline", "reinforce_plus_plus_baseline", "ppo_clip", (0.2, 0.28), "token-mean"),
])
def test_advantage_presets_resolve(name, advantage, loss, clip, agg):
    from megatron_a3po.rl_config import RLConfig, resolve_algorithm

    algorithm = resolve_algorithm(RLConfig(algorithm=name))
    assert (algorithm.advantage.name, algorithm.loss.name, algorithm.aggregation) == (advantage, loss, agg)
    assert (algorithm.loss.settings.clip_ratio_low, algorithm.loss.settings.clip_ratio_high) == clip
