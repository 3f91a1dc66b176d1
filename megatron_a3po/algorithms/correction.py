"""Rollout–training mismatch correction: importance weights from the rollout engine's policy to the trainer's.

Rollouts are sampled by vLLM (its kernels, its precision), the old-policy log-probs come from Megatron: the same
weights give slightly different distributions, so the samples are off-policy for π_old. With the per-token ratio
r = π_old / π_rollout (log r clamped to ±20):

- `tis`     (token truncated IS):       w = min(r, C)
- `mis`     (token masked IS):          w = r where r <= C (and r >= C_low when a low threshold is given), else rejected
- `icepop`  (two-sided masked IS):      w = r where C_low <= r <= C, else rejected (C_low default 1/C)
- `seq-tis` (sequence truncated IS):    w_i = min(g_i, C) on every token of response i, g_i = exp(mean_t log r)
- `seq-mis` (sequence masked IS):       w_i = g_i where C_low <= g_i <= C (C_low default 1/C), else the whole
                                         response is rejected

The weight multiplies the (already shaped) token advantage. Rejected tokens contribute nothing: they leave the
loss mask, so neither their policy-gradient term nor any KL / entropy term reaches the gradient, and they do not
count in token-mean denominators (as verl's rejection sampling). Everything is detached: weights are constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import check_choice, check_mask, check_tensor

MODES = ("none", "tis", "mis", "icepop", "seq-tis", "seq-mis")
TWO_SIDED = ("icepop", "seq-mis")  # modes whose low threshold defaults to 1 / threshold


@dataclass
class RolloutCorrectionConfig:
    mode: str = "none"
    threshold: float = 2.0  # C: truncation cap (tis, seq-tis) or upper rejection bound (mis, icepop, seq-mis)
    threshold_low: float | None = None  # C_low: lower rejection bound (icepop/seq-mis default 1/C; mis: none)

    def __post_init__(self) -> None:
        check_choice("--rollout-correction (rollout correction mode)", self.mode, MODES)
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"--rollout-correction-threshold must be a finite number > 0 (e.g. 2.0), got {self.threshold}")
        if self.threshold_low is not None:
            if self.mode in ("tis", "seq-tis"):
                raise ValueError(f"--rollout-correction-threshold-low applies to mis, icepop and seq-mis (rejection "
                                 f"bounds), not to {self.mode} (truncation); drop it")
            if not (math.isfinite(self.threshold_low) and 0 <= self.threshold_low < self.threshold):
                raise ValueError(f"--rollout-correction-threshold-low must be in [0, threshold={self.threshold}), "
                                 f"got {self.threshold_low}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def low(self) -> float:
        """The effective lower rejection bound (0: none)."""
        if self.threshold_low is not None:
            return self.threshold_low
        return 1.0 / self.threshold if self.mode in TWO_SIDED else 0.0


@dataclass
class CorrectionOutput:
    weights: torch.Tensor  # float32 [B, T]: multiplies the token advantages (1 outside the mask, 0 on rejected)
    rejected: torch.Tensor  # bool [B, T]: valid tokens taken out of the loss
    truncated: torch.Tensor  # bool [B, T]: valid tokens whose weight was capped at C


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                       config: RolloutCorrectionConfig) -> CorrectionOutput:
    """Importance weights π_old / π_rollout per token (or per response) for `config.mode` (see the module doc)."""
    mask = check_mask("mask", mask)
    check_tensor("old_logprobs", old_logprobs, shape=tuple(mask.shape))
    check_tensor("rollout_logprobs", rollout_logprobs, shape=tuple(mask.shape))
    with torch.no_grad():
        log_r = (old_logprobs.detach().float() - rollout_logprobs.detach().float()).clamp(-20.0, 20.0)
        log_r = torch.where(mask, log_r, torch.zeros_like(log_r))
        if config.mode.startswith("seq-"):
            count = mask.sum(1, keepdim=True).clamp(min=1)
            log_r = (log_r.sum(1, keepdim=True) / count).expand_as(log_r)  # log of the geometric mean, per row
        ratio = log_r.exp()
        no = torch.zeros_like(mask)
        if config.mode == "none":
            weights, rejected, truncated = torch.ones_like(ratio), no, no
        elif config.mode in ("tis", "seq-tis"):
            truncated = mask & (ratio > config.threshold)
            weights, rejected = ratio.clamp(max=config.threshold), no
        else:
            rejected = mask & ((ratio > config.threshold) | (ratio < config.low))
            weights, truncated = torch.where(rejected, torch.zeros_like(ratio), ratio), no
        weights = torch.where(mask, weights, torch.ones_like(weights))
    return CorrectionOutput(weights=weights, rejected=rejected, truncated=truncated)

