"""The numbers `a3po compare` concludes from: per-run window means, paired per-seed differences against a baseline,
and the verdict of each claim. Pure functions of the runs' metrics rows (no torch), so a hand-made table tests them.

- Windows. Step 1 is left out of every window: its rollout and its old-policy entropy come from the shared warm
  start, identical for every algorithm of a seed. Early = the first 20% of the steps from step 2, late = the last 20%,
  mean = every step from 2.
- Paired differences. The runs of one seed share the warm start, the prompts and the rollout seeds, so the
  comparison that means something is per seed: d_s = X(algorithm, s) - X(baseline, s). Reported: their mean and a
  sign count (how many seeds have d_s > 0, of those with both runs).
- Verdicts. A claim "A's X is higher than B's" holds when the mean paired difference has the claimed sign;
  "A's X is the highest" when that holds against every other algorithm. Each verdict carries its sign count (how
  many seeds agree), so one seed out of two is visibly weaker evidence than two out of two.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

WINDOW = 0.2  # early / late: the first / last 20% of the windowed steps
FIRST_STEP = 2  # windows start here: step 1 is the same for every algorithm of a seed
# per-run quantities: name -> (metric key, window) with window "early" | "late" | "mean" | "final" | "start"
QUANTITIES = {
    "entropy_early": ("entropy", "early"), "entropy_late": ("entropy", "late"), "entropy_mean": ("entropy", "mean"),
    "val_avg_start": ("val/avg@k", "start"), "val_avg_final": ("val/avg@k", "final"),
    "val_pass_final": ("val/pass@k", "final"), "length_early": ("response/length_mean", "early"),
    "length_late": ("response/length_mean", "late"), "accuracy_mean": ("reward/accuracy", "mean"),
}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def windowed_steps(by_step: dict[int, dict], key: str, window: str) -> list[int]:
    """The steps a window averages (ascending)."""
    steps = sorted(s for s, row in by_step.items() if s >= FIRST_STEP and finite(row.get(key)))
    if not steps or window == "mean":
        return steps
    n = max(1, round(WINDOW * len(steps)))
    return steps[-n:] if window == "late" else steps[:n]


def run_value(by_step: dict[int, dict], key: str, window: str) -> float | None:
    if window == "start":
        value = by_step.get(0, {}).get(key)
        return value if finite(value) else None
    if window == "final":
        steps = [s for s, row in by_step.items() if finite(row.get(key))]
        return by_step[max(steps)][key] if steps else None
    steps = windowed_steps(by_step, key, window)
    return statistics.fmean(by_step[s][key] for s in steps) if steps else None


def task_share_keys(by_step: dict[int, dict]) -> list[str]:
    return sorted({k for row in by_step.values() for k in row if k.startswith("task/") and k.endswith("_share")})


def with_task_zeros(by_step: dict[int, dict]) -> dict[int, dict]:
    """A task label absent from a step had share 0 there (the trainer logs the labels it saw)."""
    keys = task_share_keys(by_step)
    return {s: ({**{k: 0.0 for k in keys}, **row} if any(k in row for k in keys) else row)
            for s, row in by_step.items()}


def per_run(by_step: dict[int, dict]) -> dict[str, float | None]:
    """Every quantity of one run; task shares as <label>_share_late."""
    rows = with_task_zeros(by_step)
    out = {name: run_value(rows, key, window) for name, (key, window) in QUANTITIES.items()}
    early, late = out["entropy_early"], out["entropy_late"]
    out["entropy_ratio"] = late / early if early and late is not None else None
    out["length_change"] = out["length_late"] - out["length_early"] \
        if None not in (out["length_late"], out["length_early"]) else None
    for key in task_share_keys(rows):
        out[f"{key[len('task/'):]}_late"] = run_value(rows, key, "late")
    return out


def spread(values: list[float | None]) -> dict | None:
    """mean, sample std (0 for one seed), min, max, per-seed values; None when no seed has the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals}


def paired(per_seed: dict[str, dict[int, dict]], name: str, baseline: str, key: str) -> dict | None:
    """Per-seed differences name - baseline of quantity `key` over the seeds both ran: {mean, positive, seeds,
    diffs}; None when no seed has both."""
    diffs = {}
    for seed, values in sorted(per_seed.get(name, {}).items()):
        mine, theirs = values.get(key), per_seed.get(baseline, {}).get(seed, {}).get(key)
        if mine is not None and theirs is not None:
            diffs[seed] = mine - theirs
    if not diffs:
        return None
    return {"mean": statistics.fmean(diffs.values()), "positive": sum(d > 0 for d in diffs.values()),
            "seeds": len(diffs), "diffs": diffs}


@dataclass(frozen=True)
class Claim:
    """`subject`'s `key` is higher (sign +1) or lower (-1) than `other`'s, or than every other algorithm's when
    `other` is None."""

    text: str
    subject: str
    key: str
    sign: int
    other: str | None = None


def check(claim: Claim, per_seed: dict[str, dict[int, dict]]) -> dict:
    """{claim, verdict (holds | does not hold | not evaluated), agree ("k/n seeds"), detail}."""
    rivals = [claim.other] if claim.other else [n for n in per_seed if n != claim.subject]
    diffs = {r: paired(per_seed, claim.subject, r, claim.key) for r in rivals}
    missing = [r for r, d in diffs.items() if d is None]
    if claim.subject not in per_seed or not rivals or missing:
        needs = ", ".join([claim.subject, *(missing or rivals or ["another algorithm"])])
        return {"claim": claim.text, "verdict": "not evaluated", "agree": "", "detail": f"needs {needs}"}
    holds = all(d["mean"] * claim.sign > 0 for d in diffs.values())
    seeds = sorted(set.intersection(*(set(d["diffs"]) for d in diffs.values())))
    agree = sum(all(d["diffs"][s] * claim.sign > 0 for d in diffs.values()) for s in seeds)
    detail = "; ".join(f"{claim.key} {claim.subject} - {r}: {d['mean']:+.4f} (per seed "
                       + ", ".join(f"{v:+.4f}" for v in d["diffs"].values()) + ")" for r, d in diffs.items())
    return {"claim": claim.text, "verdict": "holds" if holds else "does not hold", "agree": f"{agree}/{len(seeds)}",
            "detail": detail}
