"""Rollout-mismatch correction weights and KL estimators against plain-Python `math` references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_a3po.algorithms import kl_penalty
from megatron_a3po.algorithms.correction import RolloutCorrectionConfig, rollout_correction

LENGTHS = (7, 3, 5, 1)
# Designed log r per row (C = 2, log C = 0.69; 1/C = 0.5, log = -0.69), every value at least 0.1 from a bound.
# Row 0 mixes tokens above C, below 1/C and in between (g ~ 1); row 1 has g ~ 3.2 > C; row 2 g ~ 0.9; row 3 g ~ 0.3 < 1/C.
DESIGNED_LOG_R = ([0.1, 1.2, -1.0, 0.3, -0.2, 0.9, -1.5], [1.5, 1.1, 0.9], [-0.3, 0.2, -0.9, 0.4, 0.05], [-1.2])
POLARITY = (1, -1, 1, -1)


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rollout = -3.0 * torch.rand(4, 7, generator=gen)
    log_r = 10.0 * torch.randn(4, 7, generator=gen)  # garbage on the padding
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for i, row in enumerate(DESIGNED_LOG_R):
        jitter = 0.05 * (2 * torch.rand(len(row), generator=gen) - 1)
        log_r[i, :len(row)] = torch.tensor(row) + jitter
        mask[i, :len(row)] = True
    return rollout + log_r, rollout, mask


def reference(old, rollout, mask, mode, threshold=2.0, threshold_low=None):
    """Per-row Python loops: returns (weights, rejected, truncated) as nested lists."""
    old, rollout, mask = old.tolist(), rollout.tolist(), mask.tolist()
    low = threshold_low if threshold_low is not None else (1 / threshold if mode in ("icepop", "seq-mis") else 0.0)
    weights, rejected, truncated = [], [], []
    for o_row, r_row, m_row in zip(old, rollout, mask):
        log_r = [min(max(o - r, -20.0), 20.0) for o, r in zip(o_row, r_row)]
        valid = [t for t, m in enumerate(m_row) if m]
        if mode.startswith("seq-"):
            g = math.exp(sum(log_r[t] for t in valid) / max(len(valid), 1))
            ratios = [g] * len(m_row)
        else:
            ratios = [math.exp(x) for x in log_r]
        w_row, rej_row, trunc_row = [1.0] * len(m_row), [False] * len(m_row), [False] * len(m_row)
        for t in valid:
            r = ratios[t]
            if mode == "none":
                continue
            if mode in ("tis", "seq-tis"):
                w_row[t], trunc_row[t] = min(r, threshold), r > threshold
            else:
                rej_row[t] = r > threshold or r < low
                w_row[t] = 0.0 if rej_row[t] else r
        weights.append(w_row), rejected.append(rej_row), truncated.append(trunc_row)
    return weights, rejected, truncated


def check_against_reference(out, ref):
    weights, rejected, truncated = ref
    assert out.weights.dtype == torch.float32
    torch.testing.assert_close(out.weights, torch.tensor(weights), rtol=1e-6, atol=1e-7)
    assert out.rejected.tolist() == rejected
    assert out.truncated.tolist() == truncated


@pytest.mark.parametrize("mode", ["none", "tis", "mis", "icepop", "seq-tis", "seq-mis"])
def test_every_mode_matches_reference(mode):
    old, rollout, mask = make_batch()
    old.requires_grad_(), rollout.requires_grad_()
    out = rollout_correction(old, rollout, mask, RolloutCorrectionConfig(mode))
    ref = reference(old.detach(), rollout.detach(), mask, mode)
    check_against_reference(out, ref)
    assert not (out.weights.requires_grad or out.rejected.requires_grad or out.truncated.requires_grad)
    assert out.weights[~mask].eq(1.0).all() and not out.rejected[~mask].any() and not out.truncated[~mask].any()
    # The batch exercises both sides of every bound (so the comparison is not vacuous).
    token_r = [math.exp(o - r) for o, r, m in zip(old.flatten().tolist(), rollout.flatten().tolist(),
                                                   mask.flatten().tolist()) if m]
    assert any(r > 2.0 for r in token_r) and any(r < 0.5 for r in token_r) and any(0.5 < r < 2.0 for r in token_r)
    row_g = [math.exp(sum(math.log(r) for r in token_r[sum(LENGTHS[:i]):sum(LENGTHS[:i + 1])]) / n)
             for i, n in enumerate(LENGTHS)]
    assert row_g[1] > 2.0 and row_g[3] < 0.5 and 0.5 < row_g[0] < 2.0 and 0.5 < row_g[2] < 2.0
    n_rej, n_trunc = sum(map(sum, ref[1])), sum(map(sum, ref[2]))
    if mode in ("mis", "icepop", "seq-mis"):
        assert 0 < n_rej < sum(LENGTHS) and n_trunc == 0
    elif mode in ("tis", "seq-tis"):
        assert 0 < n_trunc < sum(LENGTHS) and n_rej == 0
    if mode == "seq-mis":  # rows 1 (g > C) and 3 (g < 1/C) rejected whole, rows 0 and 2 kept
        assert [all(row[:n]) for row, n in zip(ref[1], LENGTHS)] == [False, True, False, True]


@pytest.mark.parametrize("mode,threshold_low", [("mis", 0.6), ("icepop", 0.25), ("seq-mis", 0.2)])
def test_explicit_threshold_low(mode, threshold_low):
    old, rollout, mask = make_batch(seed=1)
    out = rollout_correction(old, rollout, mask, RolloutCorrectionConfig(mode, threshold_low=threshold_low))
    ref = reference(old, rollout, mask, mode, threshold_low=threshold_low)
    check_against_reference(out, ref)
    default = reference(old, rollout, mask, mode)  # the explicit bound changes the outcome
    assert ref[1] != default[1]


def test_float_mask_and_log_ratio_clamp():
    old = torch.tensor([[30.0, 0.0], [-30.0, 1.0]])
    rollout = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    for mode in ("tis", "seq-tis"):
        out = rollout_correction(old, rollout, mask, RolloutCorrectionConfig(mode, threshold=1e12))
        check_against_reference(out, reference(old, rollout, mask.bool(), mode, threshold=1e12))
    assert math.isclose(out.weights[0, 0].item(), math.exp(10.0), rel_tol=1e-6)  # mean(clamp(30), 0) = 10


@pytest.mark.parametrize("mode,flag", [("mis", "rejected"), ("icepop", "rejected"), ("seq-mis", "rejected"),
                                       ("tis", "truncated"), ("seq-tis", "truncated")])
def test_fractions_by_polarity(mode, flag):
    old, rollout, mask = make_batch(seed=2)
    out = rollout_correction(old, rollout, mask, RolloutCorrectionConfig(mode))
    flags = getattr(out, flag)
    polarity = torch.tensor(POLARITY)
    got = {}
    for sign in (1, -1):
        side = mask & (polarity == sign)[:, None]
        got[sign] = ((flags & side).sum() / side.sum()).item()
    ref_flags = reference(old, rollout, mask, mode)[1 if flag == "rejected" else 2]
    expected = {}
    for sign in (1, -1):
        rows = [i for i, p in enumerate(POLARITY) if p == sign]
        hits = sum(ref_flags[i][t] for i in rows for t in range(LENGTHS[i]))
        expected[sign] = hits / sum(LENGTHS[i] for i in rows)
    assert any(0 < v for v in expected.values())
    for sign in (1, -1):
        assert math.isclose(got[sign], expected[sign], rel_tol=1e-6, abs_tol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="bogus"), "rollout correction mode"),
    (dict(mode="tis", threshold=0.0), "--rollout-correction-threshold "),
    (dict(mode="tis", threshold=-1.0), "--rollout-correction-threshold "),
    (dict(mode="mis", threshold=float("nan")), "--rollout-correction-threshold "),
    (dict(mode="mis", threshold=float("inf")), "--rollout-correction-threshold "),
    (dict(mode="mis", threshold=2.0, threshold_low=2.0), "--rollout-correction-threshold-low"),
    (dict(mode="icepop", threshold=2.0, threshold_low=3.0), "--rollout-correction-threshold-low"),
    (dict(mode="seq-mis", threshold=2.0, threshold_low=-0.1), "--rollout-correction-threshold-low"),
    (dict(mode="tis", threshold_low=0.5), "--rollout-correction-threshold-low"),
    (dict(mode="seq-tis", threshold_low=0.5), "--rollout-correction-threshold-low"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutCorrectionConfig(**kwargs)


def kl_reference(x, kl_type):
    """(value, d value / d logprobs) for log r = x; verl's names: k3 is low_var_kl, clamped to [-10, 10]."""
    if kl_type == "k1":
        return x, 1.0
    if kl_type == "k2":
        return x * x / 2, x
    k3, grad = math.exp(-x) + x - 1, 1 - math.exp(-x)
    if kl_type in ("k3", "low_var_kl") and abs(k3) > 10:
        return max(min(k3, 10.0), -10.0), 0.0
    return k3, grad


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3", "low_var_kl", "k3_unclamped"])
def test_kl_penalty_values_and_gradients(kl_type):
    gen = torch.Generator().manual_seed(3)
    ref = -4.0 * torch.rand(64, dtype=torch.float64, generator=gen)
    x = torch.cat([8.0 * torch.rand(61, dtype=torch.float64, generator=gen) - 4.0,
                   torch.tensor([-5.0, 1e-4, 0.0], dtype=torch.float64)])
    logprobs = (ref + x).requires_grad_()
    kl = kl_penalty(logprobs, ref, kl_type)
    kl.sum().backward()
    x_list = (logprobs.detach() - ref).tolist()
    expected = [kl_reference(v, kl_type) for v in x_list]
    torch.testing.assert_close(kl.detach(), torch.tensor([e[0] for e in expected], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logprobs.grad, torch.tensor([e[1] for e in expected], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    if kl_type in ("k3", "low_var_kl"):
        assert sum(e[0] == 10.0 for e in expected) > 1  # the clamp is exercised
    if kl_type == "k3_unclamped":
        assert max(e[0] for e in expected) > 10.0  # and absent here


def test_low_var_kl_gradient_zero_when_clamped():
    logprobs = torch.tensor([-30.0, -5.0], dtype=torch.float64, requires_grad=True)
    kl = kl_penalty(logprobs, torch.zeros(2, dtype=torch.float64), "low_var_kl")
    kl.sum().backward()
    assert kl.tolist() == [10.0, 10.0] and logprobs.grad.tolist() == [0.0, 0.0]


def test_kl_estimators_sample_means():
    p = [0.35, 0.25, 0.2, 0.12, 0.08]
    q = [0.2, 0.2, 0.25, 0.15, 0.2]
    gen = torch.Generator().manual_seed(4)
    tokens = torch.multinomial(torch.tensor(p, dtype=torch.float64), 200_000, replacement=True, generator=gen)
    logprobs = torch.tensor(p, dtype=torch.float64).log()[tokens]
    ref = torch.tensor(q, dtype=torch.float64).log()[tokens]
    exact_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    exact_k2 = sum(pi * math.log(pi / qi) ** 2 / 2 for pi, qi in zip(p, q))
    assert exact_kl > 0.05  # not trivially close to zero
    assert abs(kl_penalty(logprobs, ref, "k1").mean().item() - exact_kl) < 0.01
    assert abs(kl_penalty(logprobs, ref, "k3").mean().item() - exact_kl) < 0.01
    assert abs(kl_penalty(logprobs, ref, "k2").mean().item() - exact_k2) < 0.05
