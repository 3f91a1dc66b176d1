"""Sampling settings for training rollouts and for evaluation, and the batch a rollout returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_a3po.errors import ConfigError


@dataclass
class SamplingConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self, prefix: str = "--rollout") -> None:
        if self.n < 1:
            raise ConfigError(f"{prefix}-n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"{prefix}-temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}-top-p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"{prefix}-top-k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-response-length must be >= 1, got {self.max_new_tokens}")

    def to_vllm(self, seed_offset: int = 0):
        from vllm import SamplingParams

        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else 0,
            max_tokens=self.max_new_tokens, stop=list(self.stop) or None, seed=self.seed + seed_offset,
            logprobs=0,  # the sampled token's log-prob (after temperature / top-k / top-p), the behaviour policy
            include_stop_str_in_output=True, skip_special_tokens=False,
        )


@dataclass
class RolloutBatch:
    """Rollouts for P prompts x n responses, rows ordered prompt-major (row = prompt * n + j).

    tokens[b, :] = prompt tokens then response tokens, right-padded with `pad_id`;
    response_mask[b, t] = 1 where tokens[b, t] is a response token; rollout_logprobs[b, t] is vLLM's log-prob
    of tokens[b, t] at those positions (0 elsewhere); truncated[b] is True when the response hit the length cap.
    """

    tokens: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] float
    rollout_logprobs: torch.Tensor  # [B, T] float
    truncated: torch.Tensor  # [B] bool
    prompt_lengths: torch.Tensor  # [B] long
    response_lengths: torch.Tensor  # [B] long
    responses: list[list[int]]  # response token ids per row (for decoding / rewards)
    group_size: int
    rewards: torch.Tensor | None = None  # [B] when the engine scored the responses (RolloutEngine.generate)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_rollouts(prompts: list[list[int]], responses: list[list[list[int]]], logprobs: list[list[list[float]]],
                  truncated: list[list[bool]], pad_id: int) -> RolloutBatch:
    """Lay out per-prompt response lists as one right-padded batch."""
    n = len(responses[0]) if responses else 0
    rows = [(p, r, lp, tr) for p, rs, lps, trs in zip(prompts, responses, logprobs, truncated)
            for r, lp, tr in zip(rs, lps, trs)]
    width = max((len(p) + len(r) for p, r, _, _ in rows), default=1)
    b = len(rows)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width)
    old = torch.zeros(b, width)
    for i, (p, r, lp, _) in enumerate(rows):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        if r:
            tokens[i, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, len(p): len(p) + len(r)] = 1.0
            old[i, len(p): len(p) + len(r)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(
        tokens=tokens, response_mask=mask, rollout_logprobs=old,
        truncated=torch.tensor([tr for _, _, _, tr in rows], dtype=torch.bool),
        prompt_lengths=torch.tensor([len(p) for p, _, _, _ in rows], dtype=torch.long),
        response_lengths=torch.tensor([len(r) for _, r, _, _ in rows], dtype=torch.long),
        responses=[list(r) for _, r, _, _ in rows], group_size=n,
    )


def select_groups(parts: list[tuple[RolloutBatch, int]], pad_id: int) -> RolloutBatch:
    """One batch from whole prompt groups of several rollout batches: parts = [(batch, group index), ...].

    Dynamic sampling keeps groups from different generation rounds, which were padded to different widths.
    """
    prompts, responses, logprobs, truncated = [], [], [], []
    for batch, group in parts:
        rows = range(group * batch.group_size, (group + 1) * batch.group_size)
        start = int(batch.prompt_lengths[rows[0]])
        prompts.append(batch.tokens[rows[0], :start].tolist())
        responses.append([batch.responses[r] for r in rows])
        logprobs.append([batch.rollout_logprobs[r, start: start + len(batch.responses[r])].tolist() for r in rows])
        truncated.append([bool(batch.truncated[r]) for r in rows])
    selected = pack_rollouts(prompts, responses, logprobs, truncated, pad_id)
    if all(batch.rewards is not None for batch, _ in parts):  # the verifier's rewards travel with their rows
        selected.rewards = torch.cat([batch.rewards[g * batch.group_size:(g + 1) * batch.group_size]
                                      for batch, g in parts])
    return selected
