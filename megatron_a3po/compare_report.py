"""The report of `a3po compare`: OUTPUT/compare.png, compare.md and compare.json from the finished runs'
metrics.jsonl (OUTPUT/runs/<name>_s<seed>/).

Per algorithm, over seeds: early entropy (mean of the first 20% of RL steps) and late entropy (last 20%), their
ratio, final validation avg@k / pass@k (the evaluation after the last step), response length early / late; then
the paper's qualitative claims, each marked holds / does not hold here (or not evaluated, when its algorithms
were not run), from the means over seeds, noting when the deciding difference is within the seeds' spread (the
two standard deviations together). "Same data": the runs of one seed drew the same prompts at every step (the
trainer logs `data/prompt_digest`, a digest of the dataset indices each step drew).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from megatron_a3po.metrics import read_jsonl

WINDOW = 0.2  # early / late: the first / last 20% of the RL steps
# (title, metric keys): one panel each in compare.png; a run without a key leaves it out
PANELS = [
    ("train reward (accuracy)", "reward/accuracy"), ("validation avg@k", "val/avg@k"),
    ("validation pass@k", "val/pass@k"), ("validation response length", "val/length_mean"),
    ("entropy (all tokens)", "entropy"), ("entropy, positive responses", "pos/entropy"),
    ("entropy, negative responses", "neg/entropy"), ("response length (all)", "response/length_mean"),
    ("length, positive responses", "pos/length"), ("length, negative responses", "neg/length"),
    ("clip fraction, positive tokens", "pos/clipfrac"), ("clip fraction, negative tokens", "neg/clipfrac"),
]
# the first rollout's statistics: identical across one seed's runs when they see the same prompts
SAME_DATA_KEYS = ("reward/mean", "response/length_mean", "response/length_max")


def load_runs(out: Path, names: list[str], seeds: list[int]) -> dict[str, dict[int, dict[int, dict]]]:
    """{name: {seed: {step: merged metrics row}}} of the finished runs (final.txt written)."""
    runs: dict = {}
    for name in names:
        for seed in seeds:
            run = out / "runs" / f"{name}_s{seed}"
            if not (run / "final.txt").is_file():
                continue
            by_step: dict[int, dict] = {}
            for row in read_jsonl(run / "metrics.jsonl"):  # the final evaluation is its own row at the last step
                by_step.setdefault(int(row["step"]), {}).update(row)
            runs.setdefault(name, {})[seed] = by_step
    return runs


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def window_mean(by_step: dict[int, dict], key: str, late: bool) -> float | None:
    steps = sorted(s for s, row in by_step.items() if s > 0 and _finite(row.get(key)))
    if not steps:
        return None
    n = max(1, round(WINDOW * len(steps)))
    chosen = steps[-n:] if late else steps[:n]
    return statistics.fmean(by_step[s][key] for s in chosen)


def final_value(by_step: dict[int, dict], key: str) -> float | None:
    steps = [s for s, row in by_step.items() if _finite(row.get(key))]
    return by_step[max(steps)][key] if steps else None


def spread(values: list[float | None]) -> dict | None:
    """mean, sample std (0 for one seed), min, max, per-seed values; None when no seed has the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals}


def summarize(runs: dict) -> dict[str, dict]:
    table = {}
    for name, by_seed in runs.items():
        per_seed = {}
        for seed, by_step in by_seed.items():
            early, late = window_mean(by_step, "entropy", False), window_mean(by_step, "entropy", True)
            len_early = window_mean(by_step, "response/length_mean", False)
            len_late = window_mean(by_step, "response/length_mean", True)
            per_seed[seed] = {
                "entropy_early": early, "entropy_late": late,
                "entropy_ratio": late / early if early and late is not None else None,
                "val_avg_start": by_step.get(0, {}).get("val/avg@k"),
                "val_avg_final": final_value(by_step, "val/avg@k"),
                "val_pass_final": final_value(by_step, "val/pass@k"),
                "length_early": len_early, "length_late": len_late,
                "length_change": len_late - len_early if None not in (len_early, len_late) else None,
            }
        keys = next(iter(per_seed.values())).keys()
        table[name] = {"seeds": sorted(per_seed), **{k: spread([v[k] for v in per_seed.values()]) for k in keys}}
    return table


def _mean(table: dict, name: str, key: str) -> float | None:
    entry = table.get(name, {}).get(key)
    return entry["mean"] if entry else None


def _within_spread(table: dict, a: str, b: str, key: str) -> str:
    """A note when two algorithms' means differ by less than their seeds' standard deviations together."""
    ea, eb = table[a][key], table[b][key]
    if len(ea["values"]) < 2 or len(eb["values"]) < 2:
        return "; one seed: no spread to judge by"
    close = abs(ea["mean"] - eb["mean"]) <= ea["std"] + eb["std"]
    return f"; {a} vs {b} is within the seeds' spread (std {ea['std']:.3f} + {eb['std']:.3f})" if close else ""


def check_claims(table: dict) -> list[dict]:
    """The paper's qualitative claims against this study's means over seeds."""
    def extreme(target: str, key: str, lowest: bool) -> tuple[str, str]:
        others = {n: _mean(table, n, key) for n in table if n != target}
        others = {n: v for n, v in others.items() if v is not None}
        mine = _mean(table, target, key)
        if mine is None or not others:
            return "not evaluated", f"needs {target} and at least one other algorithm"
        rival = (min if lowest else max)(others, key=others.get)
        holds = mine <= others[rival] if lowest else mine >= others[rival]
        listing = ", ".join(f"{n} {v:.3f}" for n, v in sorted({target: mine, **others}.items(), key=lambda kv: kv[1]))
        return ("holds" if holds else "does not hold"), f"{key}: {listing}" + _within_spread(table, target, rival, key)

    def pair(a: str, b: str, key: str) -> tuple[str, str]:
        va, vb = _mean(table, a, key), _mean(table, b, key)
        if va is None or vb is None:
            return "not evaluated", f"needs {a} and {b}"
        return ("holds" if va >= vb else "does not hold"), (f"{key}: {a} {va:.3f} vs {b} {vb:.3f}"
                                                            + _within_spread(table, a, b, key))

    claims = [("PSR's entropy falls fastest (lowest late/early entropy ratio)", extreme("psr", "entropy_ratio", True)),
              ("NSR keeps the highest late entropy", extreme("nsr", "entropy_late", False)),
              ("A3PO's early entropy >= DAPO's", pair("a3po", "dapo", "entropy_early")),
              ("A3PO's final validation avg@k >= DAPO's", pair("a3po", "dapo", "val_avg_final"))]
    return [{"claim": c, "verdict": v, "detail": d} for c, (v, d) in claims]


def _data_signature(rows: dict) -> tuple:
    """The prompts a run drew: the trainer's per-step digest of the drawn dataset indices (older runs: the first
    rollout's statistics)."""
    digests = tuple(row["data/prompt_digest"] for _, row in sorted(rows.items()) if "data/prompt_digest" in row)
    return digests or tuple(rows.get(1, {}).get(k) for k in SAME_DATA_KEYS)


def same_data(runs: dict, seeds: list[int]) -> dict[int, bool | None]:
    """Per seed: did all its runs draw the same prompts at every step (None: fewer than two runs)?"""
    out = {}
    for seed in seeds:
        signatures = [_data_signature(r) for r in (s.get(seed) for s in runs.values()) if r]
        out[seed] = None if len(signatures) < 2 else len(set(signatures)) == 1
    return out


def _fmt(entry: dict | None, digits: int = 3, signed: bool = False) -> str:
    if entry is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{entry['mean']:{sign}.{digits}f}"
    return text + (f" ± {entry['std']:.{digits}f}" if len(entry["values"]) > 1 else "")


def markdown(table: dict, claims: list[dict], data: dict, settings: dict, missing: list[str]) -> str:
    lines = [f"# a3po compare: {', '.join(settings['algorithms'])} x seeds {settings['seeds']}, "
             f"{settings['train_steps']} RL steps", "",
             f"Warm start `{settings['warm_start']}`. Mean ± sample std over seeds; early / late = mean of the "
             f"first / last {WINDOW:.0%} of RL steps; validation = after the last step.", "",
             "| algorithm | seeds | entropy early | entropy late | late/early | val avg@k start | val avg@k final | "
             "val pass@k final | length early | length late | length change |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {len(row['seeds'])} | {_fmt(row['entropy_early'])} | {_fmt(row['entropy_late'])} | "
                     f"{_fmt(row['entropy_ratio'])} | {_fmt(row['val_avg_start'])} | {_fmt(row['val_avg_final'])} | "
                     f"{_fmt(row['val_pass_final'])} | {_fmt(row['length_early'], 1)} | "
                     f"{_fmt(row['length_late'], 1)} | {_fmt(row['length_change'], 1, signed=True)} |")
    lines += ["", "| paper's claim | here | numbers (means over seeds) |", "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['detail']} |" for c in claims]
    checked = {s: v for s, v in data.items() if v is not None}
    if checked:
        verdicts = ", ".join(f"seed {s}: {'yes' if v else 'NO'}" for s, v in checked.items())
        lines += ["", f"Same data per seed (the same prompts drawn at every step by every algorithm): {verdicts}."]
    if missing:
        lines += ["", f"Not finished, left out: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(runs: dict, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 4, figsize=(17, 10.5))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for ax, (panel, key) in zip(axes.flat, PANELS):
        for name in names:
            by_seed = runs.get(name, {})
            steps = sorted({s for r in by_seed.values() for s, row in r.items() if _finite(row.get(key))})
            if not steps:
                continue
            points = [[r[s][key] for r in by_seed.values() if _finite(r.get(s, {}).get(key))] for s in steps]
            mean = [statistics.fmean(p) for p in points]
            ax.plot(steps, mean, color=colours[name], label=f"{name} (n={len(by_seed)})", marker="o" if
                    len(steps) < 12 else None, markersize=3)
            if len(by_seed) > 1:
                ax.fill_between(steps, [min(p) for p in points], [max(p) for p in points], color=colours[name],
                                alpha=0.18, linewidth=0)
        ax.set_title(f"{panel}\n{key}", fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title, y=0.995, fontsize=11)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(labels) or 1, fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.945))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, names: list[str], seeds: list[int], settings: dict) -> list[Path]:
    out = Path(out)
    runs = load_runs(out, names, seeds)
    table = summarize(runs)
    claims = check_claims(table)
    data = same_data(runs, seeds)
    missing = [f"{n}_s{s}" for s in seeds for n in names if s not in runs.get(n, {})]
    paths = [out / "compare.png", out / "compare.md", out / "compare.json"]
    plot(runs, names, paths[0], f"a3po compare: mean over seeds {seeds} (band: min-max), "
                                f"{settings['train_steps']} RL steps, one colour per algorithm")
    paths[1].write_text(markdown(table, claims, data, settings, missing))
    report = {"settings": settings, "algorithms": table, "claims": claims,
              "same_data": {str(s): v for s, v in data.items()}, "missing_runs": missing}
    paths[2].write_text(json.dumps(report, indent=2) + "\n")
    return paths
