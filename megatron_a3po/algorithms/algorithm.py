"""One resolved algorithm: advantage estimator + token shaper + policy loss (+ regularisers, mismatch correction).

The trainer resolves its configuration into one `Algorithm` once and asks it, never an algorithm name, what to
compute (`needs`), how to shape (`shape`), correct (`correct`) and score a micro-batch (`micro_batch_loss`), and what to log
(`metrics`). `compute_policy_loss` is the micro-batch loss on its own, for use outside the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .aggregation import LossNormaliser, aggregate
from .common import coerce_config
from .components import Bound, declaration
from .context import AlgoContext
from .correction import CorrectionOutput, RolloutCorrectionConfig, rollout_correction
from .losses import POLICY_LOSSES, PolicyLossConfig, RegulariserConfig, add_regularisers
from .registry import get_policy_loss, get_shaper, shaper_phase


@dataclass(frozen=True)
class Algorithm:
    advantage: Bound
    shaper: Bound | None
    loss: Bound
    aggregation: str
    regularisers: RegulariserConfig = field(default_factory=RegulariserConfig)
    correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    @property
    def components(self) -> tuple[Bound, ...]:
        return tuple(c for c in (self.advantage, self.shaper, self.loss) if c is not None)

    @property
    def needs(self) -> frozenset[str]:
        """Every input the trainer must compute for this algorithm (see components.INPUTS)."""
        needs = {"old_logprobs"}  # the PPO ratio's denominator
        for part in self.components:
            needs |= part.needs
        if self.regularisers.entropy_coef > 0:
            needs.add("entropy_grad")
        if self.regularisers.kl_coef > 0:
            needs.add("ref_logprobs")
        if self.correction.enabled:
            needs.add("rollout_logprobs")
        return frozenset(needs)

    @property
    def minp_kappa(self) -> float | None:
        """The min-p proxy's kappa when a component needs proxy log-probs (read from its settings)."""
        if "proxy_logprobs" not in self.needs:
            return None
        for part in self.components:
            if "proxy_logprobs" in part.needs:
                settings = part.settings
                kappa = settings.get("minp_kappa") if isinstance(settings, dict) else getattr(settings, "minp_kappa", None)
                if kappa is None:
                    raise ValueError(f"{part.kind} {part.name!r} needs proxy_logprobs, so its settings must define "
                                     "minp_kappa (the min-p proxy's threshold, e.g. 0.02)")
                return float(kappa)
        return None

    @property
    def microbatch_shaper(self) -> Bound | None:
        return self.shaper if self.shaper is not None and self.shaper.phase == "microbatch" else None

    def advantages(self, rewards: torch.Tensor, response_mask: torch.Tensor, groups: Any,
                   correct: torch.Tensor | None = None):
        """`correct`: the verifier's verdict per response (advantages.is_correct of the reward before the overlong
        penalty), passed on to an estimator that declares it needs it (psr, nsr, w_reinforce)."""
        extra = {"correct": correct} if "correct" in self.advantage.needs else {}
        return self.advantage.fn(rewards, response_mask, groups, self.advantage.settings, **extra)

    def shape(self, ctx: AlgoContext) -> torch.Tensor | None:
        """Step-level token weights (None without a step-phase shaper): Â = A · w, once per RL step."""
        if self.shaper is None or self.shaper.phase != "step":
            return None
        return self.shaper.fn(ctx.replace(config=self.shaper.settings))

    def correct(self, ctx: AlgoContext) -> CorrectionOutput | None:
        """Rollout-mismatch importance weights from ctx.old_logprobs / ctx.rollout_logprobs (None when off)."""
        if not self.correction.enabled:
            return None
        return rollout_correction(ctx.require("old_logprobs", by="rollout correction"),
                                  ctx.require("rollout_logprobs", by="rollout correction"), ctx.response_mask,
                                  self.correction)

    def micro_batch_loss(self, ctx: AlgoContext, normaliser: LossNormaliser | None = None):
        """One micro-batch's share of the mini-batch loss, and its metrics."""
        shaper = self.microbatch_shaper
        return compute_policy_loss(ctx, self.loss.fn, loss_config=self.loss.settings, agg_mode=self.aggregation,
                                   normaliser=normaliser, shaper=shaper.fn if shaper else None,
                                   shaper_config=shaper.settings if shaper else None, regularisers=self.regularisers)

    def metrics(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in self.components:
            out.update(part.metrics(step))
        return out

    def describe(self) -> str:
        parts = [f"{part.kind}={part.name}" for part in self.components]
        extras = [f"aggregation={self.aggregation}"]
        if self.regularisers.kl_coef > 0:
            extras.append(f"kl={self.regularisers.kl_type}x{self.regularisers.kl_coef}")
        if self.regularisers.entropy_coef > 0:
            extras.append(f"entropy_coef={self.regularisers.entropy_coef}")
        if self.correction.enabled:
            extras.append(f"rollout_correction={self.correction.mode}(C={self.correction.threshold})")
        return " ".join(parts + extras)


def compute_policy_loss(
    ctx: AlgoContext,
    loss_fn: Callable[[AlgoContext], Any] | str = "ppo_clip",
    *,
    loss_config: Any = None,
    agg_mode: str = "token-mean",
    normaliser: LossNormaliser | None = None,
    shaper: Callable[[AlgoContext], torch.Tensor] | str | None = None,
    shaper_config: Any = None,
    regularisers: RegulariserConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch: [micro-batch shaper] → policy loss → regularisers → aggregate (its share of the loss).

    `shaper` is applied here only if its phase is "microbatch" (e.g. fork_tokens); step-level shapers are
    applied by the trainer once per step (their weights already sit in ctx.advantages). The entropy bonus and
    KL-to-reference terms come from `regularisers`, or else from the loss config's fields of the same names.
    """
    fn = get_policy_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn
    if fn in POLICY_LOSSES.values() or loss_config is None or isinstance(loss_config, PolicyLossConfig):
        # a registered loss gets its own settings class (gspo's is not PolicyLossConfig)
        cls = declaration(fn).settings if fn in POLICY_LOSSES.values() else PolicyLossConfig
        hook_config: Any = coerce_config(loss_config, cls, "loss_config")
        cfg = hook_config if isinstance(hook_config, PolicyLossConfig) else RegulariserConfig()
    else:  # a user hook with its own config: pass it through; regularisers read the fields they know
        hook_config = loss_config
        known = {k: getattr(loss_config, k, None) if not isinstance(loss_config, dict) else loss_config.get(k)
                 for k in ("entropy_coef", "kl_coef", "kl_type")}
        cfg = RegulariserConfig(**{k: v for k, v in known.items() if v is not None})
    if shaper is not None:
        shaper_fn = get_shaper(shaper) if isinstance(shaper, str) else shaper
        if shaper_phase(shaper_fn) == "microbatch":
            weights = shaper_fn(ctx.replace(config=shaper_config))
            ctx = ctx.replace(advantages=ctx.require("advantages", by="compute_policy_loss") * weights)
    loss_mat, metrics = fn(ctx.replace(config=hook_config))
    loss_mat = add_regularisers(loss_mat, ctx, regularisers if regularisers is not None else cfg, metrics)
    loss = aggregate(loss_mat, ctx.mask, agg_mode, normaliser=normaliser)
    return loss, metrics
