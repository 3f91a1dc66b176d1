"""Token-level advantage shapers: a3po, token_weighted (the paper's static ablation grid), fork_tokens (80/20).

A shaper maps an AlgoContext to weights [B, T]; the trainer multiplies token advantages by them
(Â_{i,t} = A_i · w_{i,t}). Each shaper carries `phase`:
- "step": computed once per RL step from the old policy, before the mini-batch split (a3po, token_weighted);
- "microbatch": computed inside the loss from the current policy (fork_tokens).

Token ranking by probability uses the old log-prob directly: exp is monotone, so the order equals the order
of exp(old_logprob), but log-probs that exp would round to the same float (e.g. several "prob == 1.0"
tokens) keep their true order. Remaining ties go to the earliest position (see selection.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import check_choice, check_fraction, check_mask, check_step, check_tensor, coerce_config
from .components import component
from .context import AlgoContext
from .selection import iter_selected_chunks, k_from_ratio, row_counts, select_k_smallest

METRICS = ("prob", "entropy")
SCHEDULES = ("linear", "static")


@dataclass
class A3POConfig:
    ratio: float = 0.2  # fraction of each response's tokens to emphasise: k_i = max(1, floor(ratio * L_i))
    rho_pos: float = 2.0  # initial weight on the selected tokens of positive responses
    alpha_pos: float = 0.005  # per-step decay: w = max(rho_pos - alpha_pos * step, 1)
    rho_neg: float = 2.0
    alpha_neg: float = 0.005
    metric: str = "prob"  # "prob" = exp(old log-prob); "entropy" = old-policy token entropy
    schedule: str = "linear"  # "linear" (decay to 1) or "static" (w = rho throughout)

    def __post_init__(self) -> None:
        _validate_a3po(self.ratio, self.rho_pos, self.alpha_pos, self.rho_neg, self.alpha_neg, self.metric, self.schedule)


@dataclass
class TokenWeightedConfig:
    metric: str = "prob"  # prob | entropy
    polarity: str = "pos"  # pos | neg: which responses are reweighted
    end: str = "low"  # low | high: the lowest- or highest-metric tokens
    ratio: float = 0.2
    scale: float = 2.0  # weight of the selected tokens (others 1)

    def __post_init__(self) -> None:
        check_choice("token_weighted.metric", self.metric, METRICS)
        check_choice("token_weighted.polarity", self.polarity, ("pos", "neg"))
        check_choice("token_weighted.end", self.end, ("low", "high"))
        check_fraction("token_weighted.ratio", self.ratio)
        if not self.scale >= 0:
            raise ValueError(f"token_weighted.scale must be >= 0, got {self.scale}")


@dataclass
class ForkTokensConfig:
    ratio: float = 0.2  # keep the top-ratio highest-entropy tokens of the micro-batch
    normalise: str = "selected"  # "selected": weight n_valid/n_kept on kept tokens; "all": weight 1 on kept tokens

    def __post_init__(self) -> None:
        check_fraction("fork_tokens.ratio", self.ratio)
        check_choice("fork_tokens.normalise", self.normalise, ("selected", "all"))


def _validate_a3po(ratio, rho_pos, alpha_pos, rho_neg, alpha_neg, metric, schedule) -> None:
    check_fraction("ratio", ratio)
    for name, value in (("rho_pos", rho_pos), ("rho_neg", rho_neg)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 (the initial token weight, paper default 2.0), got {value}")
    for name, value in (("alpha_pos", alpha_pos), ("alpha_neg", alpha_neg)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 (per-step decay of the weight, paper default 0.005), got {value}")
    check_choice("metric", metric, METRICS)
    check_choice("schedule", schedule, SCHEDULES)


def a3po_weight(step: int, rho: float, alpha: float, schedule: str = "linear") -> float:
    """w(step) = max(rho - alpha * step, 1) (linear) or rho (static). Reaches exactly 1 at step (rho - 1) / alpha."""
    step = check_step(step)
    if schedule == "static":
        return float(rho)
    check_choice("schedule", schedule, SCHEDULES)
    return max(float(rho) - float(alpha) * step, 1.0)


def _check_token_inputs(seq_advantages, values, response_mask, values_name):
    seq_advantages = check_tensor("seq_advantages", seq_advantages, ndim=1)
    mask = check_mask("response_mask", response_mask)
    check_tensor(values_name, values, shape=tuple(mask.shape))
    if seq_advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"seq_advantages has {seq_advantages.shape[0]} entries but response_mask has {mask.shape[0]} rows; "
            "pass one sequence advantage per response"
        )
    return seq_advantages, mask


def _metric_tensor(metric: str, old_logprobs: torch.Tensor | None, entropy: torch.Tensor | None, mask: torch.Tensor, by: str):
    """(tensor, name, confidence_sign): the metric and the sign that makes *smaller = less confident*
    (log-prob: +1; entropy: -1, high entropy = low confidence)."""
    if metric == "entropy":
        if entropy is None:
            raise ValueError(f'{by}: metric="entropy" needs the entropy tensor; pass entropy=<[B, T] old-policy entropy> or use metric="prob"')
        check_tensor("entropy", entropy, shape=tuple(mask.shape))
        return entropy.detach(), "entropy", -1.0
    return old_logprobs.detach(), "old_logprobs", 1.0


def a3po_selection(seq_advantages, old_logprobs, response_mask, *, ratio=0.2, metric="prob", entropy=None):
    """Bool masks (pos_selected, neg_selected) [B, T] of the tokens A3PO reweights.

    Positive responses (A > 0): their k_i least-confident tokens (lowest prob / highest entropy).
    Negative responses (A < 0): their k_i most-confident tokens (highest prob / lowest entropy).
    """
    check_fraction("ratio", ratio)
    check_choice("metric", metric, METRICS)
    values, mask, k, row_sign, name, pos, neg = _a3po_plan(seq_advantages, old_logprobs, response_mask, ratio, metric, entropy)
    selected = select_k_smallest(values, mask, k, row_sign=row_sign, name=name)
    return selected & pos.unsqueeze(1), selected & neg.unsqueeze(1)


def _a3po_plan(seq_advantages, old_logprobs, response_mask, ratio, metric, entropy):
    seq_advantages, mask = _check_token_inputs(seq_advantages, old_logprobs, response_mask, "old_logprobs")
    values, name, confidence_sign = _metric_tensor(metric, old_logprobs, entropy, mask, "a3po_token_weights")
    pos = (seq_advantages > 0).to(values.device)
    neg = (seq_advantages < 0).to(values.device)
    k = k_from_ratio(row_counts(mask), ratio)
    k = torch.where(pos | neg, k, torch.zeros_like(k))
    # positive rows: smallest confidence first; negative rows: largest confidence first
    row_sign = torch.where(pos, confidence_sign, -confidence_sign)
    return values, mask, k, row_sign, name, pos, neg


def a3po_token_weights(
    seq_advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    step: int,
    *,
    ratio: float = 0.2,
    rho_pos: float = 2.0,
    alpha_pos: float = 0.005,
    rho_neg: float = 2.0,
    alpha_neg: float = 0.005,
    metric: str = "prob",
    entropy: torch.Tensor | None = None,
    schedule: str = "linear",
) -> torch.Tensor:
    """A3PO token weights w[B, T] (float32; 1.0 outside the mask and on unselected tokens).

    w = max(rho_pos - alpha_pos * step, 1) on the selected tokens of positive responses,
        max(rho_neg - alpha_neg * step, 1) on the selected tokens of negative responses, 1 elsewhere.
    `step` is the global RL step counted from 1. Multiply: Â_{i,t} = A_i * w_{i,t}.
    """
    _validate_a3po(ratio, rho_pos, alpha_pos, rho_neg, alpha_neg, metric, schedule)
    step = check_step(step)
    w_pos = a3po_weight(step, rho_pos, alpha_pos, schedule)
    w_neg = a3po_weight(step, rho_neg, alpha_neg, schedule)
    values, mask, k, row_sign, name, pos, _ = _a3po_plan(seq_advantages, old_logprobs, response_mask, ratio, metric, entropy)
    weights = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    row_weight = torch.where(pos, w_pos, w_neg).to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=mask.device)
    for rows, width, selected in iter_selected_chunks(values, mask, k, row_sign=row_sign, name=name):
        weights[rows, :width] = torch.where(selected, row_weight[rows].unsqueeze(1), one)
    return weights


def token_weighted_weights(seq_advantages, old_logprobs, response_mask, *, metric="prob", polarity="pos", end="low",
                           ratio=0.2, scale=2.0, entropy=None) -> torch.Tensor:
    """Static ablation grid: in responses of `polarity`, weight `scale` on their k_i lowest/highest-metric tokens."""
    cfg = TokenWeightedConfig(metric=metric, polarity=polarity, end=end, ratio=ratio, scale=scale)
    seq_advantages, mask = _check_token_inputs(seq_advantages, old_logprobs, response_mask, "old_logprobs")
    values, name, _ = _metric_tensor(cfg.metric, old_logprobs, entropy, mask, "token_weighted")
    rows = (seq_advantages > 0) if cfg.polarity == "pos" else (seq_advantages < 0)
    rows = rows.to(values.device)
    k = k_from_ratio(row_counts(mask), cfg.ratio)
    k = torch.where(rows, k, torch.zeros_like(k))
    sign = torch.full(k.shape, -1.0 if cfg.end == "high" else 1.0, device=values.device)
    selected = select_k_smallest(values, mask, k, row_sign=sign, name=name)
    weights = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    return weights.masked_fill_(selected, float(cfg.scale))


def fork_token_weights(entropy, mask, *, ratio=0.2, normalise="selected") -> torch.Tensor:
    """80/20 rule: keep the top-`ratio` highest-entropy valid tokens of the whole micro-batch.

    k = max(1, floor(ratio * n_valid)) over all valid tokens of the micro-batch; ties → earliest (row-major).
    Weights: kept tokens get n_valid / k ("selected": the loss is a mean over the kept tokens, as in the paper)
    or 1 ("all": kept tokens keep their weight, the loss shrinks by ~ratio); dropped valid tokens get 0;
    tokens outside the mask get 1 (they are masked out by the loss anyway).
    """
    cfg = ForkTokensConfig(ratio=ratio, normalise=normalise)
    mask = check_mask("mask", mask)
    check_tensor("entropy", entropy, shape=tuple(mask.shape))
    entropy = entropy.detach()
    flat_valid = mask.reshape(1, -1)
    n_valid = row_counts(flat_valid)
    k = k_from_ratio(n_valid, cfg.ratio)
    kept = select_k_smallest(entropy.reshape(1, -1), flat_valid, k, row_sign=torch.full((1,), -1.0),
                             name="entropy").reshape(mask.shape)
    n_valid_i, k_i = int(n_valid), int(k)
    keep_weight = n_valid_i / k_i if (cfg.normalise == "selected" and k_i > 0) else 1.0
    weights = (~mask).to(torch.float32)  # 1 outside the mask, 0 on dropped valid tokens
    return weights.masked_fill_(kept, keep_weight)


# --- registry-facing shapers: shaper(ctx) -> weights [B, T] ------------------------------------------

def _seq_adv(ctx: AlgoContext, by: str) -> torch.Tensor:
    if ctx.seq_advantages is not None:
        return ctx.seq_advantages
    if ctx.polarity is not None:
        return ctx.polarity.to(torch.float32)
    raise ValueError(f"{by} needs AlgoContext.seq_advantages (or polarity); the trainer must fill it from the advantage output")


def _metric_needs(cfg) -> tuple[str, ...]:
    return ("old_entropy",) if cfg.metric == "entropy" else ("old_logprobs",)


def _a3po_metrics(cfg: A3POConfig, step: int) -> dict[str, float]:
    return {"a3po/weight_pos": a3po_weight(step, cfg.rho_pos, cfg.alpha_pos, cfg.schedule),
            "a3po/weight_neg": a3po_weight(step, cfg.rho_neg, cfg.alpha_neg, cfg.schedule)}


@component(settings=A3POConfig, phase="step", needs=_metric_needs, metrics=_a3po_metrics)
def a3po(ctx: AlgoContext) -> torch.Tensor:
    cfg = coerce_config(ctx.config, A3POConfig, "a3po config")
    old = ctx.require("old_logprobs", by="a3po")
    return a3po_token_weights(
        _seq_adv(ctx, "a3po"), old, ctx.response_mask, ctx.step, ratio=cfg.ratio, rho_pos=cfg.rho_pos,
        alpha_pos=cfg.alpha_pos, rho_neg=cfg.rho_neg, alpha_neg=cfg.alpha_neg, metric=cfg.metric,
        entropy=ctx.old_entropy, schedule=cfg.schedule,
    )


@component(settings=TokenWeightedConfig, phase="step", needs=_metric_needs)
def token_weighted(ctx: AlgoContext) -> torch.Tensor:
    cfg = coerce_config(ctx.config, TokenWeightedConfig, "token_weighted config")
    old = ctx.old_logprobs
    if old is None:
        if cfg.metric == "prob":
            ctx.require("old_logprobs", by="token_weighted")
        old = torch.zeros(ctx.response_mask.shape, device=ctx.response_mask.device)
    return token_weighted_weights(
        _seq_adv(ctx, "token_weighted"), old, ctx.response_mask, metric=cfg.metric, polarity=cfg.polarity,
        end=cfg.end, ratio=cfg.ratio, scale=cfg.scale, entropy=ctx.old_entropy,
    )


@component(settings=ForkTokensConfig, phase="microbatch", needs=("entropy",))
def fork_tokens(ctx: AlgoContext) -> torch.Tensor:
    cfg = coerce_config(ctx.config, ForkTokensConfig, "fork_tokens config")
    entropy = ctx.require("entropy", by="fork_tokens")
    return fork_token_weights(entropy, ctx.mask, ratio=cfg.ratio, normalise=cfg.normalise)


SHAPERS: dict[str, Any] = {"a3po": a3po, "token_weighted": token_weighted, "fork_tokens": fork_tokens}
