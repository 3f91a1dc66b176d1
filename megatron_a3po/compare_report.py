"""The report of `a3po compare`: OUTPUT/compare.png, compare_token_probs.png, compare.md and compare.json from the
finished runs' metrics.jsonl (OUTPUT/runs/<name>_s<seed>/).

Per algorithm, over seeds (compare_claims: windows from step 2): entropy early / late / mean over the run and
late/early, validation avg@k at the start and after the last step, pass@k, response length early / late, the
task's label shares late (level 6: worked answers); then the paired per-seed differences of each algorithm
against the study's baseline with their sign counts, and the study's claims, each marked holds / does not hold
(or not evaluated, when its algorithms were not run) with how many seeds agree. "Same data": the runs of one seed
drew the same prompts at every step (the trainer logs `data/prompt_digest`). The token-probability figure: the
old-policy probability of the tokens of positive and negative responses, and of the tokens A3PO selects, in the
step-1 rollout every run of a seed shares (token_stats).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from megatron_a3po import compare_claims as CC
from megatron_a3po.metrics import read_jsonl
from megatron_a3po.token_stats import HISTOGRAM_BINS, HISTOGRAM_STEP, HISTOGRAM_SERIES, histogram_key

# (title, metric key): one panel each in compare.png; a run without a key leaves it out; task shares are added
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
# the paired-difference columns of compare.md: (title, quantity)
PAIRED = [("entropy early", "entropy_early"), ("entropy late", "entropy_late"), ("entropy mean", "entropy_mean"),
          ("val avg@k final", "val_avg_final"), ("length change", "length_change")]


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


def per_seed_values(runs: dict) -> dict[str, dict[int, dict]]:
    return {name: {seed: CC.per_run(by_step) for seed, by_step in by_seed.items()} for name, by_seed in runs.items()}


def summarize(per_seed: dict[str, dict[int, dict]]) -> dict[str, dict]:
    table = {}
    for name, values in per_seed.items():
        keys = sorted({k for v in values.values() for k in v}, key=lambda k: (k not in CC.QUANTITIES, k))
        table[name] = {"seeds": sorted(values), **{k: CC.spread([v.get(k) for v in values.values()]) for k in keys}}
    return table


def paired_table(per_seed: dict, baseline: str) -> dict[str, dict]:
    """{algorithm: {quantity: paired differences vs the baseline}} for every algorithm but the baseline."""
    keys = [q for _, q in PAIRED] + sorted({k for v in per_seed.get(baseline, {}).values() for k in v
                                            if k.endswith("_share_late")})
    return {name: {k: CC.paired(per_seed, name, baseline, k) for k in keys} for name in per_seed if name != baseline}


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


def _fmt_paired(entry: dict | None) -> str:
    return "n/a" if entry is None else f"{entry['mean']:+.3f} ({entry['positive']}/{entry['seeds']} > 0)"


def markdown(table: dict, paired: dict, claims: list[dict], data: dict, settings: dict, missing: list[str]) -> str:
    shares = sorted({k for row in table.values() for k in row if k.endswith("_share_late")})
    lines = [f"# a3po compare ({settings['study']}): {', '.join(settings['algorithms'])} x seeds {settings['seeds']}, "
             f"{settings['train_steps']} RL steps", "",
             f"Warm start `{settings['warm_start']}`. Mean ± sample std over seeds; early / late = mean of the "
             f"first / last {CC.WINDOW:.0%} of RL steps from step {CC.FIRST_STEP} (step 1 is the same for every "
             "algorithm of a seed), mean = steps from 2; validation = after the last step.", "",
             "| algorithm | seeds | entropy early | entropy late | entropy mean | late/early | val avg@k start | "
             "val avg@k final | val pass@k final | length early | length late | length change | "
             + "".join(f"{k[:-len('_share_late')]} share late | " for k in shares),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(shares)]
    for name, row in table.items():
        lines.append(f"| {name} | {len(row['seeds'])} | {_fmt(row['entropy_early'])} | {_fmt(row['entropy_late'])} | "
                     f"{_fmt(row['entropy_mean'])} | {_fmt(row['entropy_ratio'])} | {_fmt(row['val_avg_start'])} | "
                     f"{_fmt(row['val_avg_final'])} | {_fmt(row['val_pass_final'])} | {_fmt(row['length_early'], 1)} | "
                     f"{_fmt(row['length_late'], 1)} | {_fmt(row['length_change'], 1, signed=True)} | "
                     + "".join(f"{_fmt(row.get(k))} | " for k in shares))
    keys = [q for _, q in PAIRED] + shares
    lines += ["", f"Paired per-seed differences against **{settings['baseline']}** (mean of algorithm − baseline "
              "over the seeds both ran; in brackets how many seeds have a positive difference):", "",
              "| algorithm | " + " | ".join([t for t, _ in PAIRED] + [k[:-len("_late")] + " late" for k in shares])
              + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(_fmt_paired(diffs.get(k)) for k in keys) + " |"
              for name, diffs in paired.items()]
    lines += ["", "| paper's claim | here | seeds agreeing | paired differences |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['agree']} | {c['detail']} |" for c in claims]
    checked = {s: v for s, v in data.items() if v is not None}
    if checked:
        verdicts = ", ".join(f"seed {s}: {'yes' if v else 'NO'}" for s, v in checked.items())
        lines += ["", f"Same data per seed (the same prompts drawn at every step by every algorithm): {verdicts}."]
    if missing:
        lines += ["", f"Not finished, left out: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: dict, names: list[str], path: Path, title: str) -> None:
    plt = _pyplot()
    shares = sorted({k for by_seed in runs.values() for r in by_seed.values() for k in CC.task_share_keys(r)})
    panels = PANELS + [(f"task: {k[len('task/'):-len('_share')]} answers (share)", k) for k in shares]
    n_rows = -(-len(panels) // 4)
    fig, axes = plt.subplots(n_rows, 4, figsize=(17, 3.5 * n_rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    filled = {name: {seed: CC.with_task_zeros(r) for seed, r in runs.get(name, {}).items()} for name in names}
    for ax, (panel, key) in zip(axes.flat, panels):
        for name in names:
            by_seed = filled[name]
            steps = sorted({s for r in by_seed.values() for s, row in r.items() if CC.finite(row.get(key))})
            if not steps:
                continue
            points = [[r[s][key] for r in by_seed.values() if CC.finite(r.get(s, {}).get(key))] for s in steps]
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
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title, y=0.995, fontsize=11)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(labels) or 1, fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.945))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def token_histograms(runs: dict, baseline: str, seeds: list[int]) -> dict[str, list[float]]:
    """Per series, the step-1 token counts per probability bin summed over seeds: one run per seed (the baseline's
    when it finished, else any), since every run of a seed shares that rollout."""
    totals = {series: [0.0] * HISTOGRAM_BINS for series in HISTOGRAM_SERIES}
    for seed in seeds:
        run = runs.get(baseline, {}).get(seed) or next((r[seed] for r in runs.values() if seed in r), None)
        row = (run or {}).get(HISTOGRAM_STEP, {})
        for series in HISTOGRAM_SERIES:
            for i in range(HISTOGRAM_BINS):
                totals[series][i] += row.get(histogram_key(series, i), 0.0)
    return totals


def plot_token_probs(hist: dict[str, list[float]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    edges = [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS)]
    for ax, side, name in zip(axes, ("pos", "neg"), ("positive", "negative")):
        for series, label, colour in ((side, f"all tokens of {name} responses", "tab:blue"),
                                      (f"a3po_{side}", "the tokens A3PO selects (20% per response)", "tab:red")):
            counts = hist[series]
            total = sum(counts) or 1.0
            ax.bar(edges, [c / total for c in counts], width=1 / HISTOGRAM_BINS, align="edge", alpha=0.5,
                   color=colour, label=f"{label} (n={int(sum(counts))})")
        ax.set_yscale("log")
        ax.set_xlabel("old-policy probability of the sampled token", fontsize=9)
        ax.set_ylabel("share of tokens", fontsize=9)
        ax.set_title(f"{name} responses (A {'>' if side == 'pos' else '<'} 0)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, names: list[str], seeds: list[int], settings: dict,
                 claims: tuple[CC.Claim, ...]) -> list[Path]:
    """settings: the study's (algorithms, seeds, train_steps, study, baseline, warm_start, ...)."""
    out = Path(out)
    runs = load_runs(out, names, seeds)
    per_seed = per_seed_values(runs)
    table, paired = summarize(per_seed), paired_table(per_seed, settings["baseline"])
    verdicts = [CC.check(claim, per_seed) for claim in claims]
    data = same_data(runs, seeds)
    hist = token_histograms(runs, settings["baseline"], seeds)
    missing = [f"{n}_s{s}" for s in seeds for n in names if s not in runs.get(n, {})]
    paths = [out / "compare.png", out / "compare_token_probs.png", out / "compare.md", out / "compare.json"]
    plot(runs, names, paths[0], f"a3po compare ({settings['study']}): mean over seeds {seeds} (band: min-max), "
                                f"{settings['train_steps']} RL steps, one colour per algorithm")
    plot_token_probs(hist, paths[1], f"step-{HISTOGRAM_STEP} rollout (shared by every run of a seed), seeds {seeds}")
    paths[2].write_text(markdown(table, paired, verdicts, data, settings, missing))
    report = {"settings": settings, "algorithms": table, "paired": paired, "claims": verdicts,
              "token_probability_histograms": hist, "same_data": {str(s): v for s, v in data.items()},
              "missing_runs": missing}
    paths[3].write_text(json.dumps(report, indent=2) + "\n")
    return paths
