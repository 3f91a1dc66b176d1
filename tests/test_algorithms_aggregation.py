"""Aggregation modes: hand-computed values and micro-batch / DP-split invariance (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from megatron_a3po.algorithms import AGG_MODES, aggregate, global_normaliser

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)  # last row: dropped response


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 21 / 5),
    ("seq-mean-token-mean", (1.5 + 6.0) / 2),  # the empty row is not a sequence of the loss
    ("seq-mean-token-sum", (3 + 18) / 2),
    ("seq-mean-token-sum-norm", 21 / (2 * 4)),
])
def test_hand_computed_modes(mode, expected):
    got = aggregate(LOSS, MASK, mode, max_len=4)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_garbage_outside_mask_is_ignored():
    loss = LOSS.clone()
    loss[~MASK] = float("nan")
    assert float(aggregate(loss, MASK, "token-mean")) == pytest.approx(21 / 5)


def _random_batch(seed, B=24, T=17):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    data = torch.randn(B, T, generator=g)
    return data, mask


def _splits(B, seed):
    """Random DP-rank x micro-batch partition of the rows (uneven sizes, shuffled order)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g)
    cuts = sorted(torch.randperm(B - 1, generator=g)[:5].add(1).tolist())
    parts = [perm[a:b] for a, b in zip([0] + cuts, cuts + [B])]
    return [parts[:3], parts[3:]]  # "rank 0" gets 3 micro-batches, "rank 1" the rest


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_microbatch_and_dp_split_invariance(mode, seed):
    data, mask = _random_batch(seed)
    w_full = torch.tensor(0.7, requires_grad=True)
    full = aggregate(torch.sin(data * w_full) * data, mask, mode, max_len=17)
    full.backward()

    ranks = _splits(data.shape[0], seed)
    all_masks = [mask[idx] for rank in ranks for idx in rank]
    norm = global_normaliser(all_masks, max_len=17)  # what the DP all-reduce of per-rank counts yields
    w_split = torch.tensor(0.7, requires_grad=True)
    total = torch.zeros(())
    for rank in ranks:
        for idx in rank:
            share = aggregate(torch.sin(data[idx] * w_split) * data[idx], mask[idx], mode, normaliser=norm)
            share.backward()  # gradient accumulation: the framework sums shares
            total = total + share.detach()
    assert float(total) == pytest.approx(float(full.detach()), abs=1e-6)
    assert float(w_split.grad) == pytest.approx(float(w_full.grad), abs=1e-5)


def test_local_normalisation_would_not_be_invariant():
    """Guard that the invariance test is meaningful: averaging per-micro-batch means differs."""
    data, mask = _random_batch(1)
    full = aggregate(data, mask, "token-mean")
    parts = [idx for rank in _splits(data.shape[0], 1) for idx in rank]
    naive = sum(aggregate(data[idx], mask[idx], "token-mean") for idx in parts) / len(parts)
    assert abs(float(naive) - float(full)) > 1e-3


def test_normaliser_counts():
    norm = global_normaliser([MASK, MASK[:1]], max_len=9)
    assert (norm.global_tokens, norm.global_seqs, norm.max_len) == (7.0, 3.0, 9)


@pytest.mark.parametrize("call, fragment", [
    (lambda: aggregate(LOSS, MASK, "sum"), "loss_agg_mode"),
    (lambda: aggregate(LOSS, MASK, "seq-mean-token-sum-norm"), "max_len"),
    (lambda: aggregate(LOSS[:2], MASK, "token-mean"), "loss_mat"),
])
def test_bad_inputs_raise(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def _dp_rank_shares(modes):
    """Runs in each of 2 gloo ranks: the rank's rows, a DP-reduced normaliser, the rank's summed shares."""
    import torch.distributed as dist

    data, mask = _random_batch(7)
    rank = dist.get_rank()
    ranks = _splits(data.shape[0], 7)
    norm = global_normaliser([mask[idx] for idx in ranks[rank]], dp_group=dist.group.WORLD, max_len=17)
    shares = {mode: sum(float(aggregate(data[idx], mask[idx], mode, normaliser=norm)) for idx in ranks[rank]) for mode in modes}
    return shares, norm.global_tokens, norm.global_seqs


def test_dp_normaliser_over_two_gloo_ranks():
    from megatron_a3po.spawn import run_in_ranks

    data, mask = _random_batch(7)
    results = run_in_ranks(_dp_rank_shares, world_size=2, args=(AGG_MODES,), timeout=120)
    assert results[0][1:] == results[1][1:] == (float(mask.sum()), float((mask.sum(1) > 0).sum()))
    for mode in AGG_MODES:
        total = results[0][0][mode] + results[1][0][mode]
        assert total == pytest.approx(float(aggregate(data, mask, mode, max_len=17)), abs=1e-6), mode
