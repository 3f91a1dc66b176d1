"""One RL step's experience on this data-parallel rank, and the two Megatron passes over it.

Layout: next-token prediction, so every per-token tensor is [B, T-1] aligned with `targets = tokens[:, 1:]`
(position t of the logits predicts token t+1). Rows are this DP rank's share of each mini-batch, so every
optimizer step sees the same global mini-batch whatever the DP size. Per-token values that only the last
pipeline stage computes (old log-probs, entropy, shaping weights) stay there: that is where the loss runs.

Micro-batches (planned by packing.py) are padded rows as stored, or packs: the rows' real tokens laid back to
back for the model (THD), while the loss sees the rows cut to their longest sequence ([b, L]); log-probs and
entropy computed on the pack are mapped back to that layout (`token_logprobs`), so the algorithms are the same
for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megatron_a3po import algorithms as A
from megatron_a3po import parallel
from megatron_a3po.logprobs import vocab_parallel_logprobs
from megatron_a3po.packing import MicroBatches


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
    ref_logprobs: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)  # real positions per row (prompt + response - 1), on the host

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: torch.Tensor | slice | list[int]) -> "Experience":
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        host_index = index.tolist() if isinstance(index, torch.Tensor) else range(len(self.lengths))[index]

        def take(value):
            return value[index.to(value.device) if isinstance(index, torch.Tensor) else index] \
                if isinstance(value, torch.Tensor) else value
        return replace(self, **{f: take(getattr(self, f)) for f in self.__dataclass_fields__ if f != "lengths"},
                       lengths=[self.lengths[i] for i in host_index])

    def to(self, device: torch.device) -> "Experience":
        """This experience on `device`: one transfer per step, before any per-token math meets the model's output."""
        return replace(self, **{f: getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__
                                if isinstance(getattr(self, f), torch.Tensor)})

    def micro_batches(self, plan: MicroBatches) -> list[dict]:
        return [self.micro_batch(rows, plan.packed, plan.multiple) for rows in plan.rows]

    def micro_batch(self, rows: list[int], packed: bool, multiple: int = 1) -> dict:
        """The loss function's tensors for `rows`. Padded: [b, T] rows as stored (the model sees them so).
        Packed: [b, L] rows cut to their longest sequence L, and the model input as one pack (see `pack_rows`)."""
        part = self.rows(rows)
        if not packed:
            return vars(part)
        width = max(part.lengths)
        batch = {f: (v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for f, v in vars(part).items()}
        batch.update(pack_rows(part.tokens, part.targets, part.lengths, multiple))
        return batch


def pack_rows(tokens: torch.Tensor, targets: torch.Tensor, lengths: list[int], multiple: int) -> dict:
    """Rows laid back to back as one sequence [1, t] (THD): `tokens`, `packed_targets`, `position_ids` restarting
    per row, `cu_seqlens` (int32, the row boundaries), `max_seqlen`, and the map back to rows: `unpack_index`
    [b, L] (position of row i's token j in the pack) with `unpack_valid`. A pack is padded to a multiple of
    `multiple` (sequence parallelism) by one more dummy sequence, which attends only to itself.
    Index tensors are built on the host from `lengths` and moved once: no device-to-host sync."""
    total = sum(lengths)
    pad = -(-total // multiple) * multiple - total
    seqlens = lengths + ([pad] if pad else [])
    offsets = torch.tensor([0] + seqlens, dtype=torch.long).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in seqlens])
    rows = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    source = rows * tokens.shape[1] + positions[:total]  # where each packed token sits in the [b, T] rows
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    unpack_index = (offsets[:len(lengths), None] + torch.arange(max(lengths))[None, :]).clamp(max=total - 1) * valid
    device = tokens.device
    source = source.to(device, non_blocking=True)
    flat = torch.nn.functional.pad(tokens.reshape(-1)[source], (0, pad)).unsqueeze(0)
    flat_targets = torch.nn.functional.pad(targets.reshape(-1)[source], (0, pad)).unsqueeze(0)
    return {"tokens": flat, "packed_targets": flat_targets, "position_ids": positions.unsqueeze(0).to(device),
            "cu_seqlens": offsets.to(torch.int32).to(device), "max_seqlen": max(seqlens),
            "unpack_index": unpack_index.to(device), "unpack_valid": valid.to(device)}


def unpack(values: torch.Tensor | None, mb: dict) -> torch.Tensor | None:
    """Per-token values of a pack ([1, t]) in the micro-batch's row layout [b, L] (0 where a row has ended)."""
    if values is None or "unpack_index" not in mb:
        return values
    return torch.where(mb["unpack_valid"], values[0][mb["unpack_index"]], torch.zeros((), dtype=values.dtype,
                                                                                      device=values.device))


def token_logprobs(logits: torch.Tensor, mb: dict, **kwargs):
    """Log-probs (and entropy / proxy as requested) of the micro-batch's targets, in its [b, L] row layout."""
    packed = "unpack_index" in mb
    out = vocab_parallel_logprobs(logits, mb["packed_targets"] if packed else mb["targets"], parallel.tp_group(),
                                  **kwargs)
    if packed:
        out = replace(out, **{f: unpack(getattr(out, f), mb) for f in ("logprobs", "entropy", "proxy_logprobs")})
    return out


_CONTEXT_FIELDS = ("response_mask", "loss_mask", "advantages", "seq_advantages", "polarity", "rewards",
                   "old_logprobs", "old_entropy", "proxy_logprobs", "rollout_logprobs", "ref_logprobs")


def algo_context(fields, *, step: int, total_steps: int, **current) -> A.AlgoContext:
    """The AlgoContext of an experience slice (`vars(exp)` or a micro-batch dict), plus `current` (the current
    policy's logprobs / entropy inside the loss). The one place hooks' inputs are assembled."""
    return A.AlgoContext(step=step, total_steps=total_steps, **{f: fields.get(f) for f in _CONTEXT_FIELDS},
                         **current)


def build_experience(rollout, rewards: torch.Tensor, adv: A.AdvantageOutput, rows: torch.Tensor) -> Experience:
    """Shift the rollout batch to next-token layout and keep this rank's rows."""
    shift = slice(1, None)
    return Experience(
        tokens=rollout.tokens[rows, :-1], targets=rollout.tokens[rows, shift],
        response_mask=rollout.response_mask[rows, shift].bool(), loss_mask=adv.loss_mask[rows, shift].bool(),
        advantages=adv.token_advantages[rows, shift].float(), seq_advantages=adv.seq_advantages[rows],
        polarity=adv.polarity[rows], rewards=rewards[rows], rollout_logprobs=rollout.rollout_logprobs[rows, shift],
        lengths=sequence_lengths(rollout, rows.tolist()),
    )


def sequence_lengths(rollout, rows: list[int] | None = None) -> list[int]:
    """Real positions of each row in next-token layout: prompt + response tokens - 1."""
    total = (rollout.prompt_lengths + rollout.response_lengths - 1).tolist()
    return total if rows is None else [total[i] for i in rows]


@dataclass
class LogprobSettings:
    temperature: float
    vocab_size: int  # true vocab size: Megatron's padded columns are excluded from the softmax
    minp_kappa: float | None = None  # a min-p proxy (lp_reg) computed in the old-policy pass


@torch.no_grad()
def compute_old_logprobs(policy, exp: Experience, plan: MicroBatches, settings: LogprobSettings) -> bool:
    """Forward-only pass: fill exp.old_logprobs / old_entropy (/ proxy) on the last stage. True if filled here."""
    def capture(logits, mb):
        out = token_logprobs(logits, mb, temperature=settings.temperature, compute_entropy=True,
                             vocab_size=settings.vocab_size, minp_kappa=settings.minp_kappa)
        return torch.zeros((), device=logits.device), {"lp": out.logprobs, "ent": out.entropy,
                                                       "proxy": out.proxy_logprobs}

    outputs = policy.forward_backward(exp.micro_batches(plan), capture, forward_only=True)
    if not outputs:
        return False
    exp.old_logprobs = _rows_back(exp, plan, [o["lp"] for o in outputs])
    exp.old_entropy = _rows_back(exp, plan, [o["ent"] for o in outputs])
    if settings.minp_kappa is not None:
        exp.proxy_logprobs = _rows_back(exp, plan, [o["proxy"] for o in outputs])
    return True


@torch.no_grad()
def compute_ref_logprobs(reference, exp: Experience, plan: MicroBatches, settings: LogprobSettings) -> None:
    """Forward-only pass of the frozen reference policy: exp.ref_logprobs on the last stage."""
    def capture(logits, mb):
        out = token_logprobs(logits, mb, temperature=settings.temperature, vocab_size=settings.vocab_size)
        return torch.zeros((), device=logits.device), {"lp": out.logprobs}

    outputs = reference.forward_backward(exp.micro_batches(plan), capture, forward_only=True)
    if outputs:
        exp.ref_logprobs = _rows_back(exp, plan, [o["lp"] for o in outputs])


def _rows_back(exp: Experience, plan: MicroBatches, values: list[torch.Tensor]) -> torch.Tensor:
    """Per-micro-batch [b, L] values in the experience's [B, T] layout (micro-batches may reorder rows)."""
    if not plan.packed and [r for rows in plan.rows for r in rows] == list(range(len(exp))):
        return torch.cat(values).float()  # padded micro-batches in row order: already [B, T]
    out = torch.zeros(exp.targets.shape, dtype=torch.float32, device=values[0].device)
    for rows, value in zip(plan.rows, values):
        out[torch.tensor(rows).to(out.device), :value.shape[1]] = value.float()
    return out


def train_mini_batch(policy, exp: Experience, plan: MicroBatches, settings: LogprobSettings, algorithm: A.Algorithm,
                     step: int, total_steps: int, max_len: int) -> tuple[dict, list[dict]]:
    """forward/backward over the mini-batch's micro-batches with the policy-loss hook, then one optimizer step."""
    outputs = policy_gradients(policy, exp, plan, settings, algorithm, step, total_steps, max_len)
    return policy.optimizer_step(), outputs


def policy_gradients(policy, exp: Experience, plan: MicroBatches, settings: LogprobSettings, algorithm: A.Algorithm,
                     step: int, total_steps: int, max_len: int) -> list[dict]:
    """forward/backward of the policy loss over the mini-batch's micro-batches; the gradients of the whole
    mini-batch (all DP ranks) end up in the DDP grad buffers. Returns the loss metrics per micro-batch."""
    from megatron.core import parallel_state as ps

    micro = exp.micro_batches(plan)
    normaliser = A.global_normaliser([mb["loss_mask"] for mb in micro], dp_group=ps.get_data_parallel_group(),
                                     max_len=max_len)
    entropy_grad = "entropy_grad" in algorithm.needs
    entropy = entropy_grad or "entropy" in algorithm.needs

    def policy_loss(logits, mb):
        cur = token_logprobs(logits, mb, temperature=settings.temperature, compute_entropy=entropy,
                             entropy_grad=entropy_grad, vocab_size=settings.vocab_size)
        ctx = algo_context(mb, step=step, total_steps=total_steps, logprobs=cur.logprobs, entropy=cur.entropy)
        share, metrics = algorithm.micro_batch_loss(ctx, normaliser)
        metrics = {k: v.detach().float() for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        metrics["pg_loss_share"] = share.detach()
        return share, metrics

    return policy.forward_backward(micro, policy_loss)
