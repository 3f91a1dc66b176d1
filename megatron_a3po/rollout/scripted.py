"""Rollouts without vLLM for runs that test training alone: launch/gpu_train_smoke.py (a GPU machine with torch +
CUDA only) and tests/test_trainer_step.py. Each "a+b=" prompt gets the correct sum first, then wrong answers of
random digits up to n, each ended by EOS, with random log-probs: every group has a positive and a negative
advantage. Draws come from the caller's generator, so a seeded caller gets the same rollouts again."""

from __future__ import annotations

import torch

from megatron_a3po.rollout.sampling import RolloutBatch, pack_rollouts


def arithmetic_batch(tokenizer, prompts: list[list[int]], n: int, generator: torch.Generator, pad_id: int,
                     score=None) -> RolloutBatch:
    """RolloutEngine.generate's result for prompts ending in "a+b=" (after any chat template); scored through
    `score(prompt_indices, responses)` as the real engine does, so the rewards travel with the batch."""
    responses, logprobs = _answers(tokenizer, prompts, n, generator)
    batch = pack_rollouts(prompts, responses, logprobs, [[False] * len(g) for g in responses], pad_id)
    if score is not None:
        rows = [(i, k) for i, group in enumerate(responses) for k in range(len(group))]
        batch.rewards = torch.tensor(score([i for i, _ in rows], [responses[i][k] for i, k in rows]),
                                     dtype=torch.float32)
    return batch


def _answers(tokenizer, prompts, n, generator):
    eos = tokenizer.eos_token_id
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    responses, logprobs = [], []
    for prompt in prompts:
        a, b = tokenizer.decode(prompt).rstrip("=").split("+")[-2:]
        answer = str(int(a.strip()) + int(b.strip()))
        group = [tokenizer.encode(answer, add_special_tokens=False) + [eos]]
        while len(group) < n:
            ids = [digits[i] for i in torch.randint(10, (2,), generator=generator).tolist()]
            if tokenizer.decode(ids).lstrip("0") != answer:
                group.append(ids + [eos])
        responses.append(group)
        logprobs.append([(-3 * torch.rand(len(r), generator=generator)).tolist() for r in group])
    return responses, logprobs
