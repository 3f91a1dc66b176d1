"""What token shaping does to the step's tokens, split by polarity (typed statistics, reduced like metrics.py's).

- Every step with a step shaper (A3PO, token_weighted): the tokens it reweighted (weight != 1) in positive and
  negative responses, their mean old-policy probability and their sum of (1 - p). (1 - p) is the size of the
  gradient of log p with respect to the sampled token's logit, so the sum says how much push the shaped tokens
  carry: A3PO's positive half picks low-probability tokens (large 1 - p), its negative half near-certain ones
  (1 - p close to 0: little effect however large the weight).
- At step 1 (the rollout every run of a seed shares in `a3po compare`): histograms of the old-policy probability
  of the tokens of positive and of negative responses, and of the tokens A3PO would select (at its default
  ratio, whatever the run's algorithm), in `HISTOGRAM_BINS` equal bins of [0, 1]: `tokprob/<series>/<bin>` counts.
"""

from __future__ import annotations

import torch

from megatron_a3po.algorithms import A3POConfig, a3po_selection
from megatron_a3po.metrics import Mean, Sum

HISTOGRAM_BINS = 20
HISTOGRAM_SERIES = ("pos", "neg", "a3po_pos", "a3po_neg")  # all tokens of +/- responses; A3PO's selection
HISTOGRAM_STEP = 1


def histogram_key(series: str, index: int) -> str:
    return f"tokprob/{series}/{index:02d}"


def shaping_statistics(exp, weights: torch.Tensor | None, shaper: str, step: int) -> dict:
    """Typed statistics of this rank's rows (see the module doc); {} without old log-probs."""
    if exp.old_logprobs is None:
        return {}
    stats: dict = {}
    mask = exp.response_mask
    prob = exp.old_logprobs.float().exp()
    if weights is not None:
        shaped = (weights != 1.0) & mask
        for name, sign in (("pos", 1), ("neg", -1)):
            rows = shaped & (exp.polarity == sign)[:, None]
            count, total = rows.sum().item(), prob[rows].sum().item()
            stats[f"{shaper}/{name}_selected_prob_mean"] = Mean(total, count)  # nan when nothing was shaped
            stats[f"{shaper}/{name}_selected_one_minus_p_sum"] = Sum(count - total)
    if step == HISTOGRAM_STEP:
        stats.update(_histograms(exp, prob, mask))
    return stats


def _histograms(exp, prob: torch.Tensor, mask: torch.Tensor) -> dict:
    settings = A3POConfig()
    sel_pos, sel_neg = a3po_selection(exp.seq_advantages, exp.old_logprobs, mask, ratio=settings.ratio)
    series = {"pos": mask & (exp.polarity > 0)[:, None], "neg": mask & (exp.polarity < 0)[:, None],
              "a3po_pos": sel_pos, "a3po_neg": sel_neg}
    stats: dict = {}
    for name in HISTOGRAM_SERIES:
        counts = torch.histc(prob[series[name]], bins=HISTOGRAM_BINS, min=0.0, max=1.0).tolist()
        stats.update({histogram_key(name, i): Sum(c) for i, c in enumerate(counts)})
    return stats
