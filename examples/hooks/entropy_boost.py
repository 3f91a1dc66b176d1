"""A user token shaper, registered from YAML (examples/hooks/entropy_boost.yaml): in positive responses, boost
the advantage of the highest-entropy tokens (the "forks" where the policy was unsure and got it right).

It declares its own settings (a dataclass: defaults and validation), its phase, the inputs it needs
(`old_entropy`: the trainer then computes the old policy's entropy for it) and a metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_a3po.algorithms import AlgoContext, component, k_from_ratio, select_k_smallest


@dataclass
class EntropyBoostConfig:
    ratio: float = 0.2  # fraction of each positive response's tokens to boost
    boost: float = 1.5  # their advantage weight (others keep 1)

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not self.boost > 0:
            raise ValueError(f"boost must be > 0, got {self.boost}")


def _metrics(cfg: EntropyBoostConfig, step: int) -> dict[str, float]:
    return {"entropy_boost/boost": cfg.boost}


@component(settings=EntropyBoostConfig, phase="step", needs=("old_entropy",), metrics=_metrics)
def entropy_boost(ctx: AlgoContext) -> torch.Tensor:
    cfg: EntropyBoostConfig = ctx.config
    entropy = ctx.require("old_entropy", by="entropy_boost")
    positive = ctx.require("seq_advantages", by="entropy_boost") > 0
    k = k_from_ratio(ctx.response_mask.sum(1), cfg.ratio) * positive  # nothing selected in other responses
    top = select_k_smallest(-entropy, ctx.response_mask, k)  # smallest -entropy = highest entropy
    return torch.where(top, cfg.boost, 1.0)
