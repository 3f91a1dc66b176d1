"""Policy losses: ppo_clip (DAPO clip-higher + dual clip), clip_cov, kl_cov, lp_reg, gspo; entropy bonus and
KL-to-ref.

A policy loss has the signature (a `module:function` user hook must match it):

    loss_fn(ctx: AlgoContext) -> (loss_mat [B, T], metrics: dict[str, Tensor])

`loss_mat` is the per-token loss (its value outside ctx.mask is ignored); `compute_policy_loss` (algorithm.py)
adds the optional entropy bonus / KL-to-reference terms and aggregates with a global normaliser (aggregation.py).
Inputs come from ctx: logprobs (current, with grad), old_logprobs, advantages (token advantages after
shaping), mask (= loss_mask or response_mask); plus ref_logprobs / entropy / proxy_logprobs when needed.
Metrics are detached micro-batch means over ctx.mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .common import check_choice, check_fraction, coerce_config, masked_mean
from .components import component
from .context import AlgoContext
from .selection import k_from_ratio, select_k_smallest

# verl's names (core_algos.kl_penalty_forward): "k3" is another name for "low_var_kl", both clamped to [-10, 10];
# the unclamped estimator has a name of its own.
KL_TYPES = ("k1", "k2", "k3", "low_var_kl", "k3_unclamped", "abs")


@dataclass
class PolicyLossConfig:
    clip_ratio_low: float = 0.2  # ratio clipped to [1 - low, 1 + high] (DAPO clip-higher: 0.2 / 0.28)
    clip_ratio_high: float = 0.28
    dual_clip_c: float | None = 3.0  # dual clip for A < 0 (loss <= -A * c); None disables; DAPO recipes use 10
    log_ratio_clamp: float = 20.0  # |log pi/pi_old| clamp before exp, for numerical safety only
    clip_cov_ratio: float = 2e-4  # clip_cov: fraction r of the micro-batch's tokens whose gradient is zeroed
    clip_cov_lb: float = 1.0  # ... chosen at random among tokens with lb < Cov < ub
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3  # kl_cov: fraction k of tokens (largest Cov) that get the |log r| penalty
    kl_cov_coef: float = 1.0  # beta
    lp_reg_ratio: float = 0.01  # lp_reg: the lowest-prob fraction of negative tokens considered
    lp_reg_coef: float = 1.0  # beta
    lp_reg_kl_type: str = "low_var_kl"
    lp_reg_kappa: float = 0.02  # min-p of the proxy; the trainer passes it to logprobs(minp_kappa=...)
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * entropy (off by default)
    kl_coef: float = 0.0  # KL to the reference policy: loss += coef * KL (off by default)
    kl_type: str = "low_var_kl"  # k1 | k2 | k3 = low_var_kl (clamped to [-10, 10]) | k3_unclamped | abs

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ValueError(f"clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}")
        if not self.clip_ratio_high >= 0.0:
            raise ValueError(f"clip_ratio_high must be >= 0, got {self.clip_ratio_high}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (e.g. 3; DAPO recipes use 10) or None to disable, got {self.dual_clip_c}")
        check_fraction("clip_cov_ratio", self.clip_cov_ratio)
        check_fraction("kl_cov_ratio", self.kl_cov_ratio)
        check_fraction("lp_reg_ratio", self.lp_reg_ratio)
        check_fraction("lp_reg_kappa", self.lp_reg_kappa)
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} >= {self.clip_cov_ub}")
        for name in ("kl_cov_coef", "lp_reg_coef", "entropy_coef", "kl_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_choice("kl_type", self.kl_type, KL_TYPES)
        check_choice("lp_reg_kl_type", self.lp_reg_kl_type, KL_TYPES)

    @property
    def minp_kappa(self) -> float:
        """The min-p proxy's threshold, for the old-log-prob pass (lp_reg)."""
        return self.lp_reg_kappa


@dataclass
class RegulariserConfig:
    """Terms added to any policy loss: loss -= entropy_coef * entropy; loss += kl_coef * KL(pi || ref)."""

    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"

    def __post_init__(self) -> None:
        for name in ("entropy_coef", "kl_coef"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        check_choice("kl_type", self.kl_type, KL_TYPES)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: k1 = log r, k2 = (log r)^2 / 2,
    k3_unclamped = exp(-log r) + log r - 1 with log r = logprobs - ref_logprobs (-log r limited to ±20 inside,
    for numerical safety); k3 = low_var_kl = k3_unclamped clamped to [-10, 10] (verl's definition)."""
    check_choice("kl_type", kl_type, KL_TYPES)
    log_r = logprobs - ref_logprobs
    if kl_type == "k1":
        return log_r
    if kl_type == "abs":
        return log_r.abs()
    if kl_type == "k2":
        return 0.5 * log_r.square()
    neg = (-log_r).clamp(-20.0, 20.0)
    k3 = torch.exp(neg) - neg - 1.0
    return k3 if kl_type == "k3_unclamped" else k3.clamp(-10.0, 10.0)


def _inputs(ctx: AlgoContext, by: str):
    logp = ctx.require("logprobs", by=by)
    old = ctx.require("old_logprobs", by=by)
    adv = ctx.require("advantages", by=by)
    return logp, old.detach(), adv.detach(), ctx.mask


def _log_ratio(logp, old, cfg):
    return (logp - old).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)


def _clipped_pg(adv, ratio, cfg, mask, metrics):
    """max(-A r, -A clip(r)), then min(., -A c) where A < 0 (dual clip)."""
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    clipped = torch.maximum(pg1, pg2)
    with torch.no_grad():
        cut = pg2 > pg1  # A > 0: ratio above 1 + high; A < 0: ratio below 1 - low
        metrics["clipfrac"] = masked_mean(cut.float(), mask)
        metrics["clipfrac_high"] = masked_mean((cut & (adv > 0)).float(), mask)
        metrics["clipfrac_low"] = masked_mean((cut & (adv < 0)).float(), mask)
        # Token counts (summed over micro-batches and ranks) for the exact per-polarity clip fractions.
        for name, side in (("pos", adv > 0), ("neg", adv < 0)):
            metrics[f"n_clipped_{name}"] = (cut & side & mask.bool()).sum().float()
            metrics[f"n_tokens_{name}"] = (side & mask.bool()).sum().float()
    if cfg.dual_clip_c is None:
        return clipped, pg1
    pg3 = -adv * cfg.dual_clip_c
    dual = torch.minimum(clipped, pg3)
    with torch.no_grad():
        metrics["clipfrac_lower"] = masked_mean(((clipped > pg3) & (adv < 0)).float(), mask)
    return torch.where(adv < 0, dual, clipped), pg1


def _common_metrics(log_ratio, mask, metrics):
    with torch.no_grad():
        metrics["ppo_kl"] = masked_mean(-log_ratio, mask)
        metrics["ratio_mean"] = masked_mean(torch.exp(log_ratio), mask)


# What each loss reads of PolicyLossConfig (bind refuses the rest). The regularisers (entropy_coef, kl_coef,
# kl_type) are the Algorithm's, set as rl.* fields, and reach no loss's settings.
_CLIP = ("clip_ratio_low", "clip_ratio_high", "dual_clip_c", "log_ratio_clamp")


@component(settings=PolicyLossConfig, needs=("old_logprobs",), reads=_CLIP)
def ppo_clip(ctx: AlgoContext):
    """PPO clipped surrogate with asymmetric clip (clip-higher) and dual clip."""
    cfg = coerce_config(ctx.config, PolicyLossConfig, "policy loss config")
    logp, old, adv, mask = _inputs(ctx, "ppo_clip")
    metrics: dict[str, torch.Tensor] = {}
    log_ratio = _log_ratio(logp, old, cfg)
    loss, _ = _clipped_pg(adv, torch.exp(log_ratio), cfg, mask, metrics)
    _common_metrics(log_ratio, mask, metrics)
    return loss, metrics


def _centered_cov(adv, logp, mask):
    """Cov_t = (A_t - mean A)(log pi_t - mean log pi), means over the micro-batch's valid tokens (detached)."""
    with torch.no_grad():
        lp = logp.detach()
        return (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))


@component(settings=PolicyLossConfig, needs=("old_logprobs",),
           reads=_CLIP + ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"))
def clip_cov(ctx: AlgoContext):
    """Clip-Cov (Cui et al. 2505.22617): PPO-clip loss, with the gradient of a random r-fraction of the tokens
    (chosen among unclipped tokens with lb < Cov < ub) set to zero. Randomness: ctx.generator."""
    cfg = coerce_config(ctx.config, PolicyLossConfig, "policy loss config")
    logp, old, adv, mask = _inputs(ctx, "clip_cov")
    metrics: dict[str, torch.Tensor] = {}
    log_ratio = _log_ratio(logp, old, cfg)
    ratio = torch.exp(log_ratio)
    loss, _ = _clipped_pg(adv, ratio, cfg, mask, metrics)
    with torch.no_grad():
        pg1 = -adv * ratio
        pg2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
        cov = _centered_cov(adv, logp, mask)
        candidates = mask & ~(pg2 > pg1) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        flat = torch.nonzero(candidates.reshape(-1), as_tuple=True)[0]
        n_clip = max(int(cfg.clip_cov_ratio * int(mask.sum())), 1)
        corr = torch.ones_like(loss, dtype=torch.bool).reshape(-1)
        if flat.numel() > 0:
            perm = torch.randperm(flat.numel(), generator=ctx.generator, device="cpu").to(flat.device)
            corr[flat[perm[:n_clip]]] = False
        corr = corr.reshape(loss.shape)
        metrics["cov_clipfrac"] = masked_mean((~corr).float(), mask)
    _common_metrics(log_ratio, mask, metrics)
    return torch.where(corr, loss, torch.zeros_like(loss)), metrics


@component(settings=PolicyLossConfig, needs=("old_logprobs",), reads=("log_ratio_clamp", "kl_cov_ratio", "kl_cov_coef"))
def kl_cov(ctx: AlgoContext):
    """KL-Cov (Cui et al. 2505.22617): unclipped policy gradient -A r, plus beta * |log r| on the
    k-fraction of tokens with the largest Cov (ties: earliest token)."""
    cfg = coerce_config(ctx.config, PolicyLossConfig, "policy loss config")
    logp, old, adv, mask = _inputs(ctx, "kl_cov")
    metrics: dict[str, torch.Tensor] = {}
    log_ratio = _log_ratio(logp, old, cfg)
    loss = -adv * torch.exp(log_ratio)
    with torch.no_grad():
        cov = _centered_cov(adv, logp, mask)
        flat_mask = mask.reshape(1, -1)
        k = k_from_ratio(flat_mask.sum(dim=1), cfg.kl_cov_ratio)
        top = select_k_smallest(-cov.reshape(1, -1).float(), flat_mask, k).reshape(mask.shape)
        metrics["kl_cov_frac"] = masked_mean(top.float(), mask)
    loss = torch.where(top, loss + cfg.kl_cov_coef * log_ratio.abs(), loss)
    _common_metrics(log_ratio, mask, metrics)
    return loss, metrics


@component(settings=PolicyLossConfig, needs=("old_logprobs", "proxy_logprobs"),
           reads=_CLIP + ("lp_reg_ratio", "lp_reg_coef", "lp_reg_kl_type", "lp_reg_kappa"))
def lp_reg(ctx: AlgoContext):
    """Lp-Reg (Huang et al. 2510.03222): PPO-clip loss; among negative-advantage tokens, the lp_reg_ratio
    fraction with the lowest current prob whose log pi < log pi_proxy (the min-p proxy built from the old
    logits, ctx.proxy_logprobs, -inf outside the proxy's support) get -A r + beta * KL(pi, proxy) instead."""
    cfg = coerce_config(ctx.config, PolicyLossConfig, "policy loss config")
    logp, old, adv, mask = _inputs(ctx, "lp_reg")
    proxy = ctx.require("proxy_logprobs", by="lp_reg").detach()
    metrics: dict[str, torch.Tensor] = {}
    log_ratio = _log_ratio(logp, old, cfg)
    ratio = torch.exp(log_ratio)
    loss, pg1 = _clipped_pg(adv, ratio, cfg, mask, metrics)
    with torch.no_grad():
        neg = mask & (adv < 0)
        flat_neg = neg.reshape(1, -1)
        k = k_from_ratio(flat_neg.sum(dim=1), cfg.lp_reg_ratio)
        low = select_k_smallest(logp.detach().reshape(1, -1).float(), flat_neg, k).reshape(mask.shape)
        reg = low & (logp.detach() < proxy)
        metrics["lp_reg_frac"] = masked_mean(reg.float(), mask)
    safe_proxy = torch.where(reg, proxy, logp.detach())  # -inf proxies never reach the KL
    kl = kl_penalty(logp, safe_proxy, cfg.lp_reg_kl_type)
    loss = torch.where(reg, pg1 + cfg.lp_reg_coef * kl, loss)
    _common_metrics(log_ratio, mask, metrics)
    return loss, metrics


@dataclass
class GSPOConfig:
    """GSPO's settings: the sequence ratio is clipped to [1 - low, 1 + high] (the paper's 3e-4 / 4e-4); the
    field names are the flat --clip-ratio-low / --clip-ratio-high flags'."""

    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    dual_clip_c = None  # not a field (no annotation): GSPO has no dual clip; what _clipped_pg reads

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ValueError(f"gspo clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}")
        if not self.clip_ratio_high >= 0.0:
            raise ValueError(f"gspo clip_ratio_high must be >= 0, got {self.clip_ratio_high}")


@component(settings=GSPOConfig, needs=("old_logprobs",), aggregation="seq-mean-token-mean")
def gspo(ctx: AlgoContext):
    """GSPO (Zheng et al. 2507.18071; verl's compute_policy_loss_gspo): one importance ratio per sequence,
    s_i = exp(mean_t (log pi - log pi_old)) over the row's ctx.mask tokens, clipped as in PPO without dual clip:
    max(-A s, -A clip(s, 1 - low, 1 + high)). Token t carries log s_it = log pi_t - sg(log pi_t) + sg(log s_i)
    (clamped at max 10), whose value is log s_i and whose gradient is that of log pi_t: an unclipped token's
    d loss / d log pi_t = -A_t s_i. Defined with seq-mean-token-mean. Metrics: _clipped_pg's (clipfrac, per
    polarity counts; a sequence is clipped as a whole); ppo_kl and ratio_mean over the sequence log-ratio
    broadcast to its tokens (ppo_kl is then the token-mean of -(log pi - log pi_old), as for ppo_clip;
    ratio_mean the token-weighted mean of s_i, the ratio that is clipped)."""
    cfg = coerce_config(ctx.config, GSPOConfig, "gspo config")
    logp, old, adv, mask = _inputs(ctx, "gspo")
    metrics: dict[str, torch.Tensor] = {}
    token_log_ratio = torch.where(mask, logp.detach() - old, torch.zeros((), dtype=logp.dtype, device=logp.device))
    seq_log_ratio = token_log_ratio.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    log_ratio = (logp - logp.detach() + seq_log_ratio).clamp(max=10.0)
    loss, _ = _clipped_pg(adv, torch.exp(log_ratio), cfg, mask, metrics)
    _common_metrics(log_ratio.detach(), mask, metrics)
    return loss, metrics


POLICY_LOSSES: dict[str, Callable[[AlgoContext], Any]] = {
    "ppo_clip": ppo_clip,
    "clip_cov": clip_cov,
    "kl_cov": kl_cov,
    "lp_reg": lp_reg,
    "gspo": gspo,
}


def add_regularisers(loss_mat: torch.Tensor, ctx: AlgoContext, cfg: RegulariserConfig | PolicyLossConfig,
                     metrics: dict) -> torch.Tensor:
    """loss -= entropy_coef * entropy; loss += kl_coef * KL(pi || ref). Both off unless their coef > 0."""
    if cfg.entropy_coef > 0:
        entropy = ctx.require("entropy", by="the entropy bonus (entropy_coef > 0)")
        if not entropy.requires_grad and loss_mat.requires_grad:
            raise ValueError("entropy_coef > 0 needs a differentiable entropy: compute it with logprobs(..., entropy_grad=True)")
        loss_mat = loss_mat - cfg.entropy_coef * entropy
    if cfg.kl_coef > 0:
        ref = ctx.require("ref_logprobs", by="the KL penalty (kl_coef > 0)")
        kl = kl_penalty(ctx.require("logprobs", by="the KL penalty"), ref.detach(), cfg.kl_type)
        with torch.no_grad():
            metrics["ref_kl"] = masked_mean(kl, ctx.mask)
        loss_mat = loss_mat + cfg.kl_coef * kl
    return loss_mat

