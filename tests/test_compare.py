"""`a3po compare` for real, at tiny size: `--study token-grid` (DAPO + the 2 x 2 token grid) and `--study pn-ratio`
(P1N1, P2N1, P1N2, P2N2), 1 seed x 2 RL steps each, 1 rank, a tiny random model as the warm start; then the
token-grid command again. The report is recomputed here from the runs' metrics.jsonl (window means from step 2,
paired differences, every verdict), the runs of the seed saw the same prompts, the step-1 token histograms count
the rollout's tokens, and the rerun trains nothing."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_a3po.compare_studies import STUDIES as COMPARE_STUDIES
from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
from helpers import REPO

STUDIES = {"token-grid": ["dapo", "pos_low", "pos_high", "neg_low", "neg_high"],
           "pn-ratio": ["P1N1", "P2N1", "P1N2", "P2N2"]}
# The smallest job that trains: 1 rank (TP=1), 4 prompts x 4 responses, 8 response tokens, 4 eval prompts x 2.
# The first-character-parity reward gives a random model mixed rewards, so every algorithm really updates.
TRAIN_FLAGS = ["--tensor-model-parallel-size", "1", "--rollout-batch-size", "4", "--ppo-mini-batch-size", "4",
               "--rollout-n", "4", "--micro-batch-size", "16", "--max-response-length", "8", "--eval-prompts", "4",
               "--eval-n", "2", "--reward", "layout_reward:first_char_parity"]


def compare(study: str, out: Path, model: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("a3po")), "compare",  # the console script, as a user runs it
           "--study", study, "--seeds", "1", "--train-steps", "2", "--output", str(out), "--hf-path", str(model),
           "--nproc-per-node", "1", "--level", "1", *TRAIN_FLAGS]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1500)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = write_tiny_hf_checkpoint(root / "tiny", "qwen2", seed=0)
    outs = {}
    for study in STUDIES:
        outs[study] = root / study
        done = compare(study, outs[study], model)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return outs, model


def rows_of(out: Path, name: str) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for line in (out / "runs" / f"{name}_s1" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    return by_step


def windows(by_step: dict[int, dict], key: str) -> dict[str, float]:
    """Independent of compare_claims: the steps from 2, a fifth of them (at least one) early and late."""
    steps = sorted(s for s in by_step if s >= 2 and key in by_step[s])
    k = max(1, round(0.2 * len(steps)))
    mean = lambda chosen: sum(by_step[s][key] for s in chosen) / len(chosen)  # noqa: E731
    return {"early": mean(steps[:k]), "late": mean(steps[-k:]), "mean": mean(steps)}


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_report_is_what_the_runs_logged(studies, study):
    out = studies[0][study]
    report = json.loads((out / "compare.json").read_text())
    for png in ("compare.png", "compare_token_probs.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert list(report["algorithms"]) == STUDIES[study] and report["missing_runs"] == []
    baseline = report["settings"]["baseline"]
    assert baseline == STUDIES[study][0]
    values = {}
    for name in STUDIES[study]:
        by_step = rows_of(out, name)
        assert sorted(by_step) == [0, 1, 2]  # the evaluation before training is step 0
        w = windows(by_step, "entropy")
        values[name] = {"entropy_early": w["early"], "entropy_late": w["late"], "entropy_mean": w["mean"],
                        "val_avg_final": by_step[2]["val/avg@k"]}
        row = report["algorithms"][name]
        for key, value in values[name].items():
            assert row[key]["values"] == pytest.approx([value], abs=1e-12), (name, key)
        assert by_step[1]["entropy"] != w["mean"] or name == baseline  # step 1 is not in the windows
    for name in STUDIES[study][1:]:  # paired differences against the baseline, with their sign count
        for key in ("entropy_early", "entropy_mean", "val_avg_final"):
            d = values[name][key] - values[baseline][key]
            got = report["paired"][name][key]
            assert got["mean"] == pytest.approx(d, abs=1e-12) and got["positive"] == int(d > 0), (name, key)
    md = (out / "compare.md").read_text()
    specs = {c.text: c for c in COMPARE_STUDIES[study].claims}
    for claim in report["claims"]:  # every verdict, recomputed from the logged entropies
        spec = specs[claim["claim"]]
        assert spec.key == "entropy_mean" and spec.other is not None
        expect = (values[spec.subject]["entropy_mean"] - values[spec.other]["entropy_mean"]) * spec.sign > 0
        assert claim["verdict"] == ("holds" if expect else "does not hold"), claim
        assert claim["agree"] == ("1/1" if expect else "0/1"), claim
        assert any(line.startswith(f"| {claim['claim']} | **{claim['verdict']}** | {claim['agree']} |")
                   for line in md.splitlines()), claim
    assert len(report["claims"]) == (4 if study == "token-grid" else 3)


def test_step_one_token_histograms_and_shaped_token_statistics(studies):
    out = studies[0]["token-grid"]
    report = json.loads((out / "compare.json").read_text())
    hist = report["token_probability_histograms"]
    first = rows_of(out, "dapo")[1]
    for side in ("pos", "neg"):  # every token of the step's positive / negative responses, once
        tokens = first[f"{side}/count"] * first[f"{side}/length"]
        assert sum(hist[side]) == pytest.approx(tokens, abs=1e-6) and tokens > 0
        assert 0 < sum(hist[f"a3po_{side}"]) < sum(hist[side])
    # the same step-1 rollout in every run: the low cell reweights less likely tokens than the high cell
    step1 = {name: rows_of(out, name)[1] for name in STUDIES["token-grid"]}
    for side in ("pos", "neg"):
        low, high = (step1[f"{side}_{end}"][f"token_weighted/{side}_selected_prob_mean"] for end in ("low", "high"))
        assert math.isfinite(low) and math.isfinite(high) and low < high, (side, low, high)
        push = step1[f"{side}_low"][f"token_weighted/{side}_selected_one_minus_p_sum"]
        assert push > step1[f"{side}_high"][f"token_weighted/{side}_selected_one_minus_p_sum"]
        other = "neg" if side == "pos" else "pos"  # a cell shapes one polarity only
        assert f"token_weighted/{other}_selected_prob_mean" not in step1[f"{side}_low"] or \
            math.isnan(step1[f"{side}_low"][f"token_weighted/{other}_selected_prob_mean"])
    assert not any(k.startswith("token_weighted/") for k in step1["dapo"])


def test_every_run_of_the_seed_saw_the_same_prompts(studies):
    for study, names in STUDIES.items():
        out = studies[0][study]
        runs = [out / "runs" / f"{name}_s1" for name in names]
        # 1. The data settings and data position each run checkpointed at its last step; only the algorithm (and the
        # run's own directories) differ.
        states = [json.loads((run / "ckpt" / "step_000002" / "a3po_train_state.json").read_text()) for run in runs]
        for state in states[1:]:
            assert state["sampler"] == states[0]["sampler"] and state["sampler"]["seed"] == 1
            differ = {f"{section}.{key}" for section in state["config"] for key in state["config"][section]
                      if state["config"][section][key] != states[0]["config"][section].get(key)}
            assert differ <= {"rl.token_shaper", "rl.advantage_estimator", "rl.output_dir", "training.save"}, differ
        # 2. The first rollout (policy still the warm start) is the same batch; every step drew the same prompts.
        firsts = [rows_of(out, name)[1] for name in names]
        for first in firsts[1:]:
            for key in ("reward/mean", "response/length_mean", "pos/count", "entropy"):
                assert first[key] == pytest.approx(firsts[0][key], abs=1e-6), (study, key)
        digests = [[rows_of(out, name)[s]["data/prompt_digest"] for s in (1, 2)] for name in names]
        assert all(d == digests[0] for d in digests), digests
        assert json.loads((out / "compare.json").read_text())["same_data"] == {"1": True}


def test_rerun_skips_finished_runs(studies):
    outs, model = studies
    out = outs["token-grid"]
    watched = [out / "runs" / f"{name}_s1" / f for name in STUDIES["token-grid"]
               for f in ("metrics.jsonl", "final.txt", "train.log")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    again = compare("token-grid", out, model)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in STUDIES["token-grid"]:
        assert f"skip {name}_s1: finished" in again.stdout
    assert "training (log:" not in again.stdout and "resuming" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert (out / "compare.md").is_file() and (out / "overlays" / "pos_low.yaml").is_file()
