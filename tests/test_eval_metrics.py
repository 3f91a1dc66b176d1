"""pass@k against brute-force enumeration of k-subsets and the closed form; avg@k and the summary layout."""

import itertools
from math import comb

import pytest

from megatron_a3po.evaluation.metrics import default_ks, macro_average, pass_at_k, summarize


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_enumeration_and_closed_form(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            closed = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) overflows a float; the product form does not.
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert pass_at_k(2000, 0, 1000) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_summary_avg_pass_lengths():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    out = summarize(correct, [[1, 2, 3, 4]] * 3, [[False, False, False, True]] * 3)
    assert default_ks(4) == [1, 2, 4] and default_ks(6) == [1, 2, 4, 6]
    assert out["avg@4"] == pytest.approx(5 / 12)
    assert out["pass@1"] == pytest.approx(out["avg@4"])  # pass@1 is the mean accuracy
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert out["length_mean"] == 2.5 and out["truncated_fraction"] == 0.25 and out["items"] == 3
    avg = macro_average({"a": out, "b": dict(out, **{"avg@4": 1.0})})
    assert avg["avg@4"] == pytest.approx((5 / 12 + 1) / 2) and "items" not in avg
