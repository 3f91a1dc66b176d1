"""The study's conclusions on hand-made tables: windows from step 2, paired per-seed differences with their sign
counts, and every kind of claim verdict both ways (and 'not evaluated')."""

import pytest

from megatron_a3po import compare_claims as CC
from megatron_a3po.compare_studies import STUDIES


def rows(values: dict[int, float], key: str = "entropy") -> dict[int, dict]:
    return {step: {key: v} for step, v in values.items()}


def test_windows_leave_out_step_one_and_take_a_fifth_of_the_rest():
    by_step = rows({1: 100.0, **{s: float(s) for s in range(2, 12)}})  # 10 steps from 2: windows of 2 steps
    assert CC.run_value(by_step, "entropy", "early") == pytest.approx(2.5)  # steps 2, 3 (step 1 is shared)
    assert CC.run_value(by_step, "entropy", "late") == pytest.approx(10.5)  # steps 10, 11
    assert CC.run_value(by_step, "entropy", "mean") == pytest.approx(6.5)
    by_step[0] = {"val/avg@k": 0.25}
    by_step[11]["val/avg@k"] = 0.5
    assert CC.run_value(by_step, "val/avg@k", "start") == 0.25 and CC.run_value(by_step, "val/avg@k", "final") == 0.5
    assert CC.run_value(rows({1: 3.0}), "entropy", "early") is None  # only the shared step: nothing to say


def test_task_shares_missing_from_a_step_count_as_zero():
    by_step = {2: {"task/worked_share": 1.0}, 3: {"task/direct_share": 1.0}, 4: {"task/worked_share": 0.5,
                                                                               "task/direct_share": 0.5}}
    values = CC.per_run(by_step)
    assert values["worked_share_late"] == 0.5  # one late step of three
    assert CC.run_value(CC.with_task_zeros(by_step), "task/worked_share", "mean") == pytest.approx(0.5)


# per_seed tables: {algorithm: {seed: {quantity: value}}}
TABLE = {
    "dapo": {1: {"entropy_mean": 0.50, "val_avg_final": 0.60}, 2: {"entropy_mean": 0.40, "val_avg_final": 0.70}},
    "up": {1: {"entropy_mean": 0.55, "val_avg_final": 0.58}, 2: {"entropy_mean": 0.45, "val_avg_final": 0.69}},
    "mixed": {1: {"entropy_mean": 0.60, "val_avg_final": 0.61}, 2: {"entropy_mean": 0.38, "val_avg_final": 0.70}},
    "down": {1: {"entropy_mean": 0.45}, 2: {"entropy_mean": 0.30}},
}


def test_paired_differences_are_per_seed_with_a_sign_count():
    d = CC.paired(TABLE, "mixed", "dapo", "entropy_mean")
    assert d["diffs"] == pytest.approx({1: 0.10, 2: -0.02}) and d["mean"] == pytest.approx(0.04)
    assert (d["positive"], d["seeds"]) == (1, 2)
    assert CC.paired(TABLE, "down", "dapo", "val_avg_final") is None  # no seed has both


@pytest.mark.parametrize("claim, verdict, agree", [
    (CC.Claim("up raises entropy", "up", "entropy_mean", +1, "dapo"), "holds", "2/2"),
    (CC.Claim("up lowers entropy", "up", "entropy_mean", -1, "dapo"), "does not hold", "0/2"),
    (CC.Claim("mixed raises entropy", "mixed", "entropy_mean", +1, "dapo"), "holds", "1/2"),  # mean +0.04
    (CC.Claim("mixed lowers entropy", "mixed", "entropy_mean", -1, "dapo"), "does not hold", "1/2"),
    (CC.Claim("down lowers entropy", "down", "entropy_mean", -1, "dapo"), "holds", "2/2"),
    (CC.Claim("up validates better", "up", "val_avg_final", +1, "dapo"), "does not hold", "0/2"),
    (CC.Claim("down has the lowest entropy", "down", "entropy_mean", -1), "holds", "2/2"),
    (CC.Claim("up has the highest entropy", "up", "entropy_mean", +1), "holds", "1/2"),  # vs mixed: -0.05, +0.07
    (CC.Claim("dapo has the highest entropy", "dapo", "entropy_mean", +1), "does not hold", "0/2"),
    (CC.Claim("mixed has the highest entropy", "mixed", "entropy_mean", +1), "does not hold", "1/2"),  # vs up
    (CC.Claim("nsr raises entropy", "nsr", "entropy_mean", +1, "dapo"), "not evaluated", ""),
    (CC.Claim("up vs nobody", "up", "entropy_mean", +1, "psr"), "not evaluated", ""),
    (CC.Claim("down validates better", "down", "val_avg_final", +1, "dapo"), "not evaluated", ""),
])
def test_claim_verdicts_both_ways(claim, verdict, agree):
    got = CC.check(claim, TABLE)
    assert (got["verdict"], got["agree"]) == (verdict, agree), got
    if verdict != "not evaluated":
        assert f"{claim.subject} - " in got["detail"]


def test_every_study_names_its_baseline_and_claims_only_its_algorithms():
    for name, spec in STUDIES.items():
        assert spec.baseline in spec.algorithms, name
        for claim in spec.claims:
            assert claim.subject in spec.algorithms and claim.other in (None, *spec.algorithms), (name, claim)
            assert claim.key in CC.QUANTITIES or claim.key == "entropy_ratio", (name, claim)
        assert set(spec.overlays) <= set(spec.algorithms), name


def test_bad_study_choices_are_refused_in_one_line(tmp_path, capsys):
    from megatron_a3po import compare

    assert compare.main(["--study", "token-grid", "--baseline", "psr", "--output", str(tmp_path / "s")]) == 2
    assert "--baseline psr: not among the algorithms run (dapo, pos_low, pos_high, neg_low, neg_high)" in \
        capsys.readouterr().err
    assert compare.main(["--study", "pn-ratio", "--algorithms", "P1N1,P3N1", "--output", str(tmp_path / "p")]) == 2
    assert "unknown algorithm 'P3N1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an unknown study
        compare.main(["--study", "everything"])
    # a study's overlays are real config files a user can rerun with --config
    study = compare.Study(*compare.parse_args(["--study", "pn-ratio", "--output", str(tmp_path / "q")]))
    assert study.items["P2N1"] == ["--config", str(tmp_path / "q" / "overlays" / "P2N1.yaml")]
    assert "pos_weight: 2.0, neg_weight: 1.0" in (tmp_path / "q" / "overlays" / "P2N1.yaml").read_text()
