"""The one object every hook (advantage estimator, token shaper, policy loss) can read.

The trainer fills what it has at the point of the call; hooks read what they need and fail clearly when a
field they need is missing (`ctx.require("entropy", by="fork_tokens")`). All tensors are [B, T] in the
response layout (T = padded response length) unless noted.

Phases
- step level (once per RL step, before the mini-batch split): rewards, seq_advantages, advantages,
  polarity, response_mask, old_logprobs, rollout_logprobs, old_entropy, ref_logprobs, step, total_steps →
  shapers with `phase == "step"` and the rollout correction. Fields a component did not declare in its
  `needs` may be None (the trainer computes only what the resolved algorithm needs).
- micro-batch level (inside the loss function): the same fields sliced to the micro-batch plus logprobs
  (current policy, with grad), entropy (current policy; with grad only if a loss term needs it),
  ref_logprobs, proxy_logprobs → policy losses and shapers with `phase == "microbatch"`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AlgoContext:
    """Inputs for algorithm hooks. `step` is the global RL step counted from 1 (the first update is step 1)."""

    response_mask: torch.Tensor  # bool [B, T]: valid response tokens
    step: int = 1
    total_steps: int | None = None
    config: Any = None  # the config of the hook being called (a dataclass or a dict of its fields)

    rewards: torch.Tensor | None = None  # [B] outcome rewards
    seq_advantages: torch.Tensor | None = None  # [B] A_i
    advantages: torch.Tensor | None = None  # [B, T] token advantages (after shaping, inside the loss)
    polarity: torch.Tensor | None = None  # int8 [B]: sign(A_i) in {-1, 0, +1}
    loss_mask: torch.Tensor | None = None  # bool [B, T]: tokens that enter the loss (psr/nsr drop rows); default response_mask

    old_logprobs: torch.Tensor | None = None  # [B, T] old policy (pi_old) log-probs of the sampled tokens
    rollout_logprobs: torch.Tensor | None = None  # [B, T] the rollout engine's (behaviour policy) log-probs
    old_entropy: torch.Tensor | None = None  # [B, T] old policy token entropy
    logprobs: torch.Tensor | None = None  # [B, T] current policy log-probs (requires grad)
    entropy: torch.Tensor | None = None  # [B, T] current policy entropy
    ref_logprobs: torch.Tensor | None = None  # [B, T] reference policy log-probs (KL penalty)
    proxy_logprobs: torch.Tensor | None = None  # [B, T] log pi_proxy(token) of the min-p proxy (lp_reg)

    generator: torch.Generator | None = None  # randomness for clip_cov; None → torch's global RNG
    extras: dict[str, Any] = field(default_factory=dict)  # anything a user hook wants to pass along

    def __post_init__(self) -> None:
        if not isinstance(self.response_mask, torch.Tensor) or self.response_mask.dim() != 2:
            shape = tuple(self.response_mask.shape) if isinstance(self.response_mask, torch.Tensor) else type(self.response_mask).__name__
            raise ValueError(f"AlgoContext.response_mask must be a [batch, response_length] tensor, got {shape}")
        if self.response_mask.dtype != torch.bool:
            self.response_mask = self.response_mask != 0
        if self.loss_mask is not None and self.loss_mask.dtype != torch.bool:
            self.loss_mask = self.loss_mask != 0
        for name in ("advantages", "old_logprobs", "rollout_logprobs", "old_entropy", "logprobs", "entropy", "ref_logprobs", "proxy_logprobs", "loss_mask"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != tuple(self.response_mask.shape):
                raise ValueError(
                    f"AlgoContext.{name} has shape {tuple(value.shape)} but response_mask is {tuple(self.response_mask.shape)}; "
                    "all per-token tensors must share the [batch, response_length] layout"
                )
        for name in ("rewards", "seq_advantages", "polarity"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (self.response_mask.shape[0],):
                raise ValueError(f"AlgoContext.{name} must have shape ({self.response_mask.shape[0]},), got {tuple(value.shape)}")

    @property
    def mask(self) -> torch.Tensor:
        """Tokens that enter the loss: loss_mask if given, else response_mask."""
        return self.loss_mask if self.loss_mask is not None else self.response_mask

    def require(self, name: str, *, by: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{by} needs AlgoContext.{name}, which is None; the trainer must fill it before calling {by}")
        return value

    def replace(self, **changes: Any) -> "AlgoContext":
        return dataclasses.replace(self, **changes)
