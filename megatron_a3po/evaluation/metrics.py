"""avg@k, unbiased pass@k (Chen et al. 2021) and response-length statistics over an [items x n] score matrix."""

from __future__ import annotations

import statistics
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)
    = 1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(correct: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]] | None = None,
              truncated: Sequence[Sequence[bool]] | None = None, ks: Sequence[int] | None = None) -> dict:
    """correct[i][j] in {0, 1} for item i, sample j (all items have the same n). Returns avg@n, pass@k for each
    k, the number of items and samples, and length statistics in tokens."""
    if not correct:
        raise ValueError("no items to summarize")
    n = len(correct[0])
    if n < 1 or any(len(row) != n for row in correct):
        raise ValueError(f"every item needs the same number of samples (n={n})")
    ks = sorted(set(ks or default_ks(n)))
    if ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"k values {ks} must lie in [1, n={n}]")
    counts = [sum(1 for v in row if v > 0) for row in correct]
    out = {"items": len(correct), "n": n, f"avg@{n}": sum(counts) / (len(correct) * n)}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    if lengths is not None:
        flat = [int(x) for row in lengths for x in row]
        out.update({"length_mean": statistics.fmean(flat), "length_median": statistics.median(flat),
                    "length_max": max(flat), "length_min": min(flat)})
    if truncated is not None:
        flat_t = [bool(x) for row in truncated for x in row]
        out["truncated_fraction"] = sum(flat_t) / len(flat_t)
    return out


def macro_average(per_benchmark: dict[str, dict]) -> dict:
    """Unweighted mean over benchmarks of every metric they all share (the paper's "average" column)."""
    if not per_benchmark:
        return {}
    keys = set.intersection(*(set(m) for m in per_benchmark.values()))
    skip = {"items", "n", "length_min", "length_max"}
    return {k: sum(m[k] for m in per_benchmark.values()) / len(per_benchmark)
            for k in sorted(keys - skip) if all(isinstance(m[k], (int, float)) for m in per_benchmark.values())}
