"""`a3po compare` for real: 2 algorithms x 1 seed x 2 RL steps (1 rank, a tiny random model as the warm start),
then the same command again. Checks the report's structure, that the rerun trains nothing, and that both runs
saw the same prompts (same data settings and data position in their checkpoints, identical first rollout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
from helpers import REPO

ALGORITHMS = ["dapo", "a3po"]
CLAIMS = ["PSR's entropy falls fastest", "NSR keeps the highest late entropy", "A3PO's early entropy >= DAPO's",
          "A3PO's final validation avg@k >= DAPO's"]
# The smallest job that trains: 1 rank (TP=1), 4 prompts x 4 responses, 8 response tokens, 4 eval prompts x 2.
# The first-character-parity reward gives a random model mixed rewards, so both algorithms really update.
TRAIN_FLAGS = ["--tensor-model-parallel-size", "1", "--rollout-batch-size", "4", "--ppo-mini-batch-size", "4",
               "--rollout-n", "4", "--micro-batch-size", "16", "--max-response-length", "8", "--eval-prompts", "4",
               "--eval-n", "2", "--reward", "layout_reward:first_char_parity"]


def compare(out: Path, model: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("a3po")), "compare",  # the console script, as a user runs it
           "--algorithms", ",".join(ALGORITHMS), "--seeds", "1", "--train-steps", "2", "--output", str(out),
           "--hf-path", str(model), "--nproc-per-node", "1", "--level", "1", *TRAIN_FLAGS]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1500)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = write_tiny_hf_checkpoint(root / "tiny", "qwen2", seed=0)
    out = root / "study"
    first = compare(out, model)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, model, first


def test_report_structure(study):
    out, _, first = study
    for name in ALGORITHMS:
        assert f"{name}_s1: training" in first.stdout
        assert (out / "runs" / f"{name}_s1" / "final.txt").is_file()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "compare.json").read_text())
    assert list(report["algorithms"]) == ALGORITHMS and report["missing_runs"] == []
    for name in ALGORITHMS:
        row = report["algorithms"][name]
        assert row["seeds"] == [1]
        for key in ("entropy_early", "entropy_late", "entropy_ratio", "val_avg_final", "val_pass_final",
                    "length_change"):
            assert row[key] is not None and len(row[key]["values"]) == 1, key
    verdicts = {c["claim"]: c["verdict"] for c in report["claims"]}
    assert [c for c in CLAIMS if any(v.startswith(c) for v in verdicts)] == CLAIMS
    for claim, verdict in verdicts.items():  # psr / nsr were not run; the A3PO-vs-DAPO claims were
        expected = {"not evaluated"} if claim.startswith(("PSR", "NSR")) else {"holds", "does not hold"}
        assert verdict in expected, (claim, verdict)
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| dapo | 1 |") for line in table) and any(line.startswith("| a3po | 1 |")
                                                                           for line in table)
    for claim in CLAIMS:
        assert any(line.startswith(f"| {claim}") and "**" in line for line in table), claim


def test_both_runs_saw_the_same_prompts(study):
    out, _, _ = study
    runs = [out / "runs" / f"{name}_s1" for name in ALGORITHMS]
    # 1. The data settings and the data position each run checkpointed at its last step: same dataset, seed,
    # sampler state; only the algorithm (and the run's own directories) differ.
    states = [json.loads((run / "ckpt" / "step_000002" / "a3po_train_state.json").read_text()) for run in runs]
    assert states[0]["sampler"] == states[1]["sampler"] and states[0]["sampler"]["seed"] == 1
    differ = {f"{section}.{key}" for section in states[0]["config"] for key in states[0]["config"][section]
              if states[0]["config"][section][key] != states[1]["config"][section].get(key)}
    assert differ <= {"rl.algorithm", "rl.output_dir", "training.save"}, differ
    # 2. The first rollout (policy still the warm start) is the same batch: same prompts, same rollout seeds.
    firsts = [next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["step"] == 1) for run in runs]
    for key in ("reward/mean", "response/length_mean", "response/length_max", "pos/count", "entropy"):
        assert firsts[0][key] == pytest.approx(firsts[1][key], abs=1e-6), key
    assert json.loads((out / "compare.json").read_text())["same_data"] == {"1": True}
    # 3. Every step drew the same prompts (the trainer logs a digest of the dataset indices each step drew).
    digests = [[json.loads(line)["data/prompt_digest"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "data/prompt_digest" in line] for run in runs]
    assert len(digests[0]) == 2 and digests[0] == digests[1], digests


def test_rerun_skips_finished_runs(study):
    out, model, _ = study
    watched = [out / "runs" / f"{name}_s1" / f for name in ALGORITHMS for f in ("metrics.jsonl", "final.txt",
                                                                                "train.log")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    again = compare(out, model)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for name in ALGORITHMS:
        assert f"skip {name}_s1: finished" in again.stdout
    assert "training (log:" not in again.stdout and "resuming" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert (out / "compare.md").is_file()
