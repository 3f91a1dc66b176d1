"""One RL step's experience on this data-parallel rank, and the two Megatron passes over it.

Layout: next-token prediction, so every per-token tensor is [B, T-1] aligned with `targets = tokens[:, 1:]`
(position t of the logits predicts token t+1). Rows are this DP rank's share of each mini-batch, so every
optimizer step sees the same global mini-batch whatever the DP size. Per-token values that only the last
pipeline stage computes (old log-probs, entropy, shaping weights) stay there: that is where the loss runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megatron_a3po import algorithms as A
from megatron_a3po import parallel
from megatron_a3po.logprobs import vocab_parallel_logprobs

PER_TOKEN = ("targets", "response_mask", "loss_mask", "advantages", "old_logprobs", "old_entropy",
             "proxy_logprobs", "rollout_logprobs")


@dataclass
class Experience:
    tokens: torch.Tensor  # [B, T-1] model inputs
    targets: torch.Tensor  # [B, T-1]
    response_mask: torch.Tensor  # bool [B, T-1]
    loss_mask: torch.Tensor  # bool [B, T-1]
    advantages: torch.Tensor  # [B, T-1] token advantages (shaped once old log-probs are known)
    seq_advantages: torch.Tensor  # [B]
    polarity: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B]
    rollout_logprobs: torch.Tensor  # [B, T-1] vLLM's log-probs of the sampled tokens
    old_logprobs: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    proxy_logprobs: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: torch.Tensor | slice) -> "Experience":
        def take(value):
            return value[index] if isinstance(value, torch.Tensor) else value
        return replace(self, **{f: take(getattr(self, f)) for f in self.__dataclass_fields__ if f != "extras"})

    def to(self, device: torch.device) -> "Experience":
        """This experience on `device`: one transfer per step, before any per-token math meets the model's output."""
        return replace(self, **{f: getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__
                                if isinstance(getattr(self, f), torch.Tensor)})

    def micro_batches(self, size: int) -> list[dict]:
        return [vars(self.rows(slice(i, i + size))) for i in range(0, len(self), size)]


def local_rows(num_rows: int, mini_batch_rows: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Global row indices this DP rank trains on: its contiguous share of every mini-batch, in order."""
    per_rank = mini_batch_rows // dp_size
    starts = torch.arange(0, num_rows, mini_batch_rows)
    return (starts[:, None] + dp_rank * per_rank + torch.arange(per_rank)[None, :]).reshape(-1)


def build_experience(rollout, rewards: torch.Tensor, adv: A.AdvantageOutput, rows: torch.Tensor) -> Experience:
    """Shift the rollout batch to next-token layout and keep this rank's rows."""
    shift = slice(1, None)
    return Experience(
        tokens=rollout.tokens[rows, :-1], targets=rollout.tokens[rows, shift],
        response_mask=rollout.response_mask[rows, shift].bool(), loss_mask=adv.loss_mask[rows, shift].bool(),
        advantages=adv.token_advantages[rows, shift].float(), seq_advantages=adv.seq_advantages[rows],
        polarity=adv.polarity[rows], rewards=rewards[rows], rollout_logprobs=rollout.rollout_logprobs[rows, shift],
    )


@dataclass
class LogprobSettings:
    temperature: float
    vocab_size: int  # true vocab size: Megatron's padded columns are excluded from the softmax
    minp_kappa: float | None = None  # lp_reg's proxy, computed in the old-policy pass


@torch.no_grad()
def compute_old_logprobs(policy, exp: Experience, micro_batch_size: int, settings: LogprobSettings) -> bool:
    """Forward-only pass: fill exp.old_logprobs / old_entropy (/ proxy) on the last stage. True if filled here."""
    def capture(logits, mb):
        out = vocab_parallel_logprobs(logits, mb["targets"], parallel.tp_group(), temperature=settings.temperature,
                                      compute_entropy=True, vocab_size=settings.vocab_size,
                                      minp_kappa=settings.minp_kappa)
        return torch.zeros((), device=logits.device), {"lp": out.logprobs, "ent": out.entropy,
                                                       "proxy": out.proxy_logprobs}

    outputs = policy.forward_backward(exp.micro_batches(micro_batch_size), capture, forward_only=True)
    if not outputs:
        return False
    exp.old_logprobs = torch.cat([o["lp"] for o in outputs]).float()
    exp.old_entropy = torch.cat([o["ent"] for o in outputs]).float()
    if settings.minp_kappa is not None:
        exp.proxy_logprobs = torch.cat([o["proxy"] for o in outputs]).float()
    return True


@dataclass
class LossSettings:
    loss: str
    loss_config: A.PolicyLossConfig
    agg_mode: str
    shaper: str | None
    shaper_config: object
    step: int
    total_steps: int


def train_mini_batch(policy, mini: Experience, micro_batch_size: int, settings: LogprobSettings, loss: LossSettings,
                     max_len: int) -> tuple[dict, list[dict]]:
    """forward/backward over the mini-batch's micro-batches with the policy-loss hook, then one optimizer step."""
    from megatron.core import parallel_state as ps

    micro = mini.micro_batches(micro_batch_size)
    normaliser = A.global_normaliser([mb["loss_mask"] for mb in micro], dp_group=ps.get_data_parallel_group(),
                                     max_len=max_len)
    needs_entropy = loss.shaper == "fork_tokens" or loss.loss_config.entropy_coef > 0

    def policy_loss(logits, mb):
        cur = vocab_parallel_logprobs(logits, mb["targets"], parallel.tp_group(), temperature=settings.temperature,
                                      compute_entropy=needs_entropy, entropy_grad=loss.loss_config.entropy_coef > 0,
                                      vocab_size=settings.vocab_size)
        ctx = A.AlgoContext(
            response_mask=mb["response_mask"], loss_mask=mb["loss_mask"], advantages=mb["advantages"],
            logprobs=cur.logprobs, old_logprobs=mb["old_logprobs"], entropy=cur.entropy,
            proxy_logprobs=mb["proxy_logprobs"], polarity=mb["polarity"], seq_advantages=mb["seq_advantages"],
            rewards=mb["rewards"], step=loss.step, total_steps=loss.total_steps,
        )
        share, metrics = A.compute_policy_loss(ctx, loss.loss, loss_config=loss.loss_config, agg_mode=loss.agg_mode,
                                               normaliser=normaliser, shaper=loss.shaper,
                                               shaper_config=loss.shaper_config)
        metrics = {k: v.detach().float() for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        metrics["pg_loss_share"] = share.detach()
        return share, metrics

    outputs = policy.forward_backward(micro, policy_loss)
    return policy.optimizer_step(), outputs
