"""Outcome advantage estimators: grpo, dr_grpo, psr, nsr, w_reinforce, polarity_weighted, rloo,
reinforce_plus_plus_baseline.

Every estimator has the same signature (so a `module:function` user hook can replace it):

    fn(rewards[B], response_mask[B, T], groups, config=None) -> AdvantageOutput

An estimator that declares `needs=("correct",)` also receives `correct=` (bool [B]: the verifier's verdict per
response, `is_correct` of its reward before the overlong penalty), so correctness never depends on penalties.

`groups` is either an int n (responses of one prompt are contiguous: rows [0..n), [n..2n), ...) or an
int tensor [B] of group ids (any values; rows with the same id belong to the same prompt).

Polarity is sign(A_i): A > 0 positive, A < 0 negative, A == 0 neither. Group statistics are computed in
float64 relative to the group's minimum reward, so a group whose rewards are all equal (all correct, all
wrong, or all equally penalised) gets A == 0 exactly — never a 1e-10 that would flip its polarity.
Exception: reinforce_plus_plus_baseline whitens over the whole batch afterwards, which shifts every A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import check_finite_where, check_mask, check_tensor, coerce_config
from .components import component


@dataclass
class AdvantageConfig:
    epsilon: float = 1e-6  # A = (r - mean) / (std + epsilon)
    norm_by_std: bool = True  # grpo/psr/nsr/polarity_weighted; dr_grpo never divides by std
    pos_weight: float = 1.0  # P: scales A > 0 (paper's P:N study); used by grpo, dr_grpo, polarity_weighted
    neg_weight: float = 1.0  # N: scales A < 0
    w_reinforce_lambda: float = 0.1  # w_reinforce: +lambda for correct responses, -1 for incorrect ones

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"advantage epsilon must be >= 0, got {self.epsilon}")
        for name in ("pos_weight", "neg_weight", "w_reinforce_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"advantage {name} must be >= 0, got {getattr(self, name)}")


@dataclass
class AdvantageOutput:
    seq_advantages: torch.Tensor  # float32 [B]: A_i
    token_advantages: torch.Tensor  # float32 [B, T]: A_i on valid tokens, 0 elsewhere
    polarity: torch.Tensor  # int8 [B]: sign(A_i)
    loss_mask: torch.Tensor  # bool [B, T]: response tokens that enter the loss (psr/nsr: correct/wrong rows only)


# What each estimator reads of AdvantageConfig (bind refuses the rest: a setting it would ignore is an error)
_GROUP_NORM = ("epsilon", "norm_by_std")
_PN_WEIGHTS = ("pos_weight", "neg_weight")


def is_correct(verifier_rewards: torch.Tensor) -> torch.Tensor:
    """bool [B]: the verifier judged the response correct. The one rule everywhere (PSR/NSR rows, W-REINFORCE,
    reward/accuracy, dynamic sampling's counts): its reward *before* the overlong penalty is > 0, which is 1 vs
    0 (math, arithmetic) and +1 vs -1 (math_dapo)."""
    return verifier_rewards > 0


def _correct(correct: Any, rewards: torch.Tensor, by: str) -> torch.Tensor:
    if correct is None:  # called without the trainer: the rewards are the verifier's own
        return is_correct(rewards)
    correct = check_tensor("correct", correct, ndim=1)
    if correct.shape != rewards.shape or correct.dtype != torch.bool:
        raise ValueError(f"{by}: correct must be a bool tensor of shape {tuple(rewards.shape)} (one verdict per "
                         f"response), got {correct.dtype} {tuple(correct.shape)}")
    return correct.to(rewards.device)


def _check_inputs(rewards: Any, response_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = check_tensor("rewards", rewards, ndim=1)
    mask = check_mask("response_mask", response_mask)
    if mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"rewards has {rewards.shape[0]} entries but response_mask has {mask.shape[0]} rows; pass one reward per response"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    check_finite_where("rewards", rewards, torch.ones_like(rewards, dtype=torch.bool))
    return rewards, mask


def group_ids(groups: Any, batch: int, device: torch.device) -> torch.Tensor:
    """Dense group index in [0, G) for every row, from an int n or a tensor of arbitrary ids."""
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1 or batch % groups != 0:
            raise ValueError(
                f"groups={groups} must be a positive divisor of the batch size {batch} (n responses per prompt, contiguous); "
                "or pass a [batch] tensor of group ids"
            )
        return torch.arange(batch, device=device) // groups
    ids = check_tensor("groups", groups, ndim=1)
    if ids.shape[0] != batch:
        raise ValueError(f"groups has {ids.shape[0]} ids but the batch has {batch} responses; pass one group id per response")
    if ids.is_floating_point():
        raise ValueError("groups must be an int n or an integer tensor of group ids, got a float tensor")
    return torch.unique(ids.to(device), return_inverse=True)[1]


def group_centered(rewards: torch.Tensor, groups: Any, *, norm_by_std: bool, epsilon: float) -> torch.Tensor:
    """(r - mean_group) [/ (std_group + eps)], std unbiased; singleton groups → 0. float64 result."""
    B = rewards.shape[0]
    gid = group_ids(groups, B, rewards.device)
    G = int(gid.max()) + 1 if B else 0
    r = rewards.to(torch.float64)
    gmin = torch.full((G,), float("inf"), dtype=torch.float64, device=r.device).scatter_reduce(0, gid, r, "amin")
    shifted = r - gmin[gid]  # exactly 0 for every member of an all-equal group
    counts = torch.bincount(gid, minlength=G).to(torch.float64)
    mean = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, gid, shifted) / counts
    dev = shifted - mean[gid]
    if not norm_by_std:
        return dev
    ssd = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, gid, dev * dev)
    std = torch.sqrt(ssd / (counts - 1).clamp(min=1.0))
    return dev / (std[gid] + epsilon)


def _finish(seq: torch.Tensor, mask: torch.Tensor, cfg: AdvantageConfig, *, rows: torch.Tensor | None = None,
            weights: bool = True) -> AdvantageOutput:
    """`rows`: bool [B], the responses that enter the loss (None: all)."""
    if weights and (cfg.pos_weight != 1.0 or cfg.neg_weight != 1.0):
        seq = torch.where(seq > 0, seq * cfg.pos_weight, torch.where(seq < 0, seq * cfg.neg_weight, seq))
    seq = seq.to(torch.float32)
    polarity = torch.sign(seq).to(torch.int8)
    loss_mask = mask if rows is None else mask & rows.unsqueeze(1)
    token = seq.unsqueeze(1) * loss_mask.to(seq.dtype)
    return AdvantageOutput(seq_advantages=seq, token_advantages=token, polarity=polarity, loss_mask=loss_mask)


@component(settings=AdvantageConfig, reads=_GROUP_NORM + _PN_WEIGHTS, group_baseline=True)
def grpo(rewards, response_mask, groups, config=None) -> AdvantageOutput:
    """GRPO: A_i = (r_i - mean_group) / (std_group + eps), unbiased std; then P/N polarity weights."""
    cfg = coerce_config(config, AdvantageConfig)
    rewards, mask = _check_inputs(rewards, response_mask)
    seq = group_centered(rewards, groups, norm_by_std=cfg.norm_by_std, epsilon=cfg.epsilon)
    return _finish(seq, mask, cfg)


@component(settings=AdvantageConfig, reads=_PN_WEIGHTS, group_baseline=True)
def dr_grpo(rewards, response_mask, groups, config=None) -> AdvantageOutput:
    """Dr. GRPO: A_i = r_i - mean_group (no std normalisation). Pair with seq-mean-token-sum-norm."""
    cfg = coerce_config(config, AdvantageConfig)
    rewards, mask = _check_inputs(rewards, response_mask)
    seq = group_centered(rewards, groups, norm_by_std=False, epsilon=cfg.epsilon)
    return _finish(seq, mask, cfg)


@component(settings=AdvantageConfig, reads=_GROUP_NORM + _PN_WEIGHTS, group_baseline=True)
def polarity_weighted(rewards, response_mask, groups, config=None) -> AdvantageOutput:
    """GRPO advantages with positive ones scaled by config.pos_weight (P) and negative ones by neg_weight (N)."""
    return grpo(rewards, response_mask, groups, config)


def _sample_reinforcement(rewards, response_mask, groups, config, correct, keep_correct: bool, by: str):
    """PSR / NSR as the reference trainer runs them: GRPO advantages of the whole batch (every group's baseline
    sees all its responses), then only the correct (PSR) or only the wrong (NSR) responses enter the loss. A
    kept response of an all-correct (PSR) or all-wrong (NSR) group has A = 0 and counts in the token-mean
    denominator, as in the reference."""
    cfg = coerce_config(config, AdvantageConfig)
    rewards, mask = _check_inputs(rewards, response_mask)
    correct = _correct(correct, rewards, by)
    seq = group_centered(rewards, groups, norm_by_std=cfg.norm_by_std, epsilon=cfg.epsilon)
    return _finish(seq, mask, cfg, rows=correct if keep_correct else ~correct, weights=False)


@component(settings=AdvantageConfig, reads=_GROUP_NORM, needs=("correct",), group_baseline=True)
def psr(rewards, response_mask, groups, config=None, correct=None) -> AdvantageOutput:
    """Positive-sample reinforcement: GRPO advantages of the whole batch; only correct responses enter the loss."""
    return _sample_reinforcement(rewards, response_mask, groups, config, correct, True, "psr")


@component(settings=AdvantageConfig, reads=_GROUP_NORM, needs=("correct",), group_baseline=True)
def nsr(rewards, response_mask, groups, config=None, correct=None) -> AdvantageOutput:
    """Negative-sample reinforcement: GRPO advantages of the whole batch; only wrong responses enter the loss."""
    return _sample_reinforcement(rewards, response_mask, groups, config, correct, False, "nsr")


@component(settings=AdvantageConfig, reads=("w_reinforce_lambda",), needs=("correct",))
def w_reinforce(rewards, response_mask, groups, config=None, correct=None) -> AdvantageOutput:
    """Weighted-REINFORCE (Zhu et al.): +lambda for correct responses, -1 for incorrect ones, no baseline.

    `groups` is accepted for signature compatibility and ignored (there is no group baseline).
    """
    cfg = coerce_config(config, AdvantageConfig)
    rewards, mask = _check_inputs(rewards, response_mask)
    correct = _correct(correct, rewards, "w_reinforce")
    seq = torch.where(correct, torch.full_like(rewards, cfg.w_reinforce_lambda), torch.full_like(rewards, -1.0))
    return _finish(seq.to(torch.float64), mask, cfg, weights=False)


def _group_sizes(groups: Any, rewards: torch.Tensor) -> torch.Tensor:
    """float64 [B]: the number of responses in each row's group."""
    gid = group_ids(groups, rewards.shape[0], rewards.device)
    return torch.bincount(gid)[gid].to(torch.float64)


@component(settings=AdvantageConfig, reads=(), group_baseline=True)
def rloo(rewards, response_mask, groups, config=None) -> AdvantageOutput:
    """RLOO (leave-one-out baseline, verl's compute_rloo_outcome_advantage): in a group of n > 1 responses,
    A_i = r_i - mean of the other n - 1 rewards = n / (n - 1) * (r_i - mean_group); a group of one keeps A = r.
    Computed relative to the group minimum in float64 (an all-equal group gets A = 0 exactly); no settings."""
    cfg = coerce_config(config, AdvantageConfig)
    rewards, mask = _check_inputs(rewards, response_mask)
    n = _group_sizes(groups, rewards)
    dev = group_centered(rewards, groups, norm_by_std=False, epsilon=0.0)
    seq = torch.where(n > 1, dev * n / (n - 1).clamp(min=1.0), rewards.to(torch.float64))
    return _finish(seq, mask, cfg, weights=False)


@component(settings=AdvantageConfig, reads=(), group_baseline=True)
def reinforce_plus_plus_baseline(rewards, response_mask, groups, config=None) -> AdvantageOutput:
    """REINFORCE++ with a group baseline (verl's compute_reinforce_plus_plus_baseline_outcome_advantage):
    d_i = r_i - mean_group (a group of one: d = r), tiled over the response's valid tokens, then whitened over
    all N valid tokens of the batch: A = (d - mu) / sqrt(var + 1e-8), mu and the unbiased var over those tokens
    (N <= 1 raises). Every token of a row gets the same value, so seq_advantages is it and polarity its sign.
    The whitening shifts by the batch mean: an all-equal group gets A = -mu / sqrt(var + 1e-8), generally not 0
    (as in verl), so its polarity is not 0. No settings (the 1e-8 is fixed, as in verl)."""
    cfg = coerce_config(config, AdvantageConfig)
    rewards, mask = _check_inputs(rewards, response_mask)
    n = _group_sizes(groups, rewards)
    dev = group_centered(rewards, groups, norm_by_std=False, epsilon=0.0)
    d = torch.where(n > 1, dev, rewards.to(torch.float64))
    lengths = mask.sum(dim=1).to(torch.float64)  # each row's d counts once per valid token
    total = float(lengths.sum())
    if total <= 1:
        raise ValueError(f"reinforce_plus_plus_baseline whitens over all valid response tokens of the batch and "
                         f"needs at least 2 of them (an unbiased variance), got {int(total)}; check response_mask")
    mu = (lengths * d).sum() / total
    var = (lengths * (d - mu) ** 2).sum() / (total - 1)
    return _finish((d - mu) * torch.rsqrt(var + 1e-8), mask, cfg, weights=False)


ADVANTAGE_FNS = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "psr": psr,
    "nsr": nsr,
    "w_reinforce": w_reinforce,
    "polarity_weighted": polarity_weighted,
    "rloo": rloo,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
}
