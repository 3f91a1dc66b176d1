"""Step metrics: exact per-polarity clip fractions through the (sum, count) reduction, and dynamic sampling's
re-packing of kept prompt groups from rollout batches of different widths."""

import math

import torch

from megatron_a3po import metrics as M
from megatron_a3po.algorithms import AlgoContext, get_policy_loss
from megatron_a3po.experience import Experience
from megatron_a3po.rollout.sampling import pack_rollouts, select_groups


def _experience(polarity, lengths, width=6):
    rows = len(polarity)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    adv = torch.tensor(polarity, dtype=torch.float32)[:, None].expand(rows, width).clone()
    return Experience(tokens=torch.zeros(rows, width, dtype=torch.long), targets=torch.zeros(rows, width, dtype=torch.long),
                      response_mask=mask, loss_mask=mask, advantages=adv, seq_advantages=adv[:, 0],
                      polarity=torch.tensor(polarity), rewards=torch.zeros(rows),
                      rollout_logprobs=torch.full((rows, width), -1.0), old_logprobs=torch.full((rows, width), -1.0),
                      old_entropy=torch.ones(rows, width))


def test_polarity_clip_fractions_are_exact_over_micro_batches():
    torch.manual_seed(0)
    exp = _experience([1, 1, -1, -1, 1, -1], [6, 3, 5, 2, 4, 6])
    log_ratio = torch.randn(6, 6) * 0.3
    outputs, clipped = [], {1: 0, -1: 0}
    for rows in (slice(0, 2), slice(2, 6)):  # two micro-batches of different sizes: a mean of means would be off
        mb = exp.rows(rows)
        logp = (mb.old_logprobs + log_ratio[rows]).requires_grad_()
        ctx = AlgoContext(response_mask=mb.response_mask, loss_mask=mb.loss_mask, advantages=mb.advantages,
                          logprobs=logp, old_logprobs=mb.old_logprobs)
        _, metrics = get_policy_loss("ppo_clip")(ctx)
        outputs.append({k: v.detach() for k, v in metrics.items()})
    # Independent count: A > 0 tokens clip above 1.28, A < 0 tokens below 0.8 (clip-higher 0.2 / 0.28).
    ratio = log_ratio.exp()
    for r in range(6):
        for t in range(int(exp.response_mask[r].sum())):
            sign = int(exp.polarity[r])
            clipped[sign] += int(ratio[r, t] > 1.28) if sign > 0 else int(ratio[r, t] < 0.8)
    pos_tokens = int(exp.response_mask[exp.polarity > 0].sum())
    neg_tokens = int(exp.response_mask[exp.polarity < 0].sum())
    result = M.reduce_statistics(M.step_statistics(exp, None, outputs, num_updates=1))
    assert 0 < clipped[1] < pos_tokens and 0 < clipped[-1] < neg_tokens
    assert math.isclose(result["pos/clipfrac"], clipped[1] / pos_tokens, rel_tol=1e-9)
    assert math.isclose(result["neg/clipfrac"], clipped[-1] / neg_tokens, rel_tol=1e-9)
    assert "loss/clipfrac_high" in result and "loss/clipfrac_low" in result
    assert not any(k.startswith("n_") for k in result)  # raw counts are folded into the ratios


def test_select_groups_repacks_whole_groups_across_batches():
    a = pack_rollouts([[1, 2], [3]], [[[5], [6, 7]], [[8, 9, 9], [4]]], [[[-.1], [-.2, -.3]], [[-.4, -.5, -.6], [-.7]]],
                      [[False, False], [True, False]], pad_id=0)
    b = pack_rollouts([[7, 7, 7, 7]], [[[2], []]], [[[-.9], []]], [[False, True]], pad_id=0)
    a.rewards, b.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0])
    out = select_groups([(b, 0), (a, 1)], pad_id=0)
    # the verifier's rewards travel with their rows (PSR / NSR read them as the correctness verdict)
    assert out.rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
    expected = pack_rollouts([[7, 7, 7, 7], [3]], [[[2], []], [[8, 9, 9], [4]]],
                             [[[-.9], []], [[-.4, -.5, -.6], [-.7]]], [[False, True], [True, False]], pad_id=0)
    for field in ("tokens", "response_mask", "rollout_logprobs", "truncated", "prompt_lengths", "response_lengths"):
        torch.testing.assert_close(getattr(out, field), getattr(expected, field), rtol=0, atol=1e-7)
    assert out.responses == expected.responses and out.group_size == 2
