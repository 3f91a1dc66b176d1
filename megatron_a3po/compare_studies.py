"""The studies `a3po compare --study NAME` runs: which algorithms, against which baseline, and the paper's claims
each one checks (compare_claims.Claim). Algorithms that are not presets are config overlays, written by compare
into OUTPUT/overlays/<name>.yaml (a file a user can rerun with `--config`).

- polarity (default): PSR, NSR, DAPO, A3PO (arXiv 2512.21625's main comparison).
- token-grid: the paper's token-level mechanism study, DAPO plus the 2 x 2 grid of static token weights
  (positive / negative responses x their low / high-probability tokens, ratio 0.2, weight 2). The paper: boosting
  low-probability tokens of positive responses and high-probability tokens of negative ones raises entropy
  relative to DAPO; the other two cells lower it.
- pn-ratio: P:N advantage weights (positive advantages x P, negative x N) around P1N1 (= DAPO): the paper's
  polarity thesis, positive samples sharpen (lower entropy), negative samples keep exploring (higher entropy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_a3po.compare_claims import Claim


@dataclass(frozen=True)
class StudySpec:
    algorithms: tuple[str, ...]  # presets or overlay names (keys of `overlays`), in the order they run
    baseline: str
    claims: tuple[Claim, ...]
    overlays: dict[str, str] = field(default_factory=dict)  # name -> YAML text


def _token_cell(polarity: str, end: str) -> str:
    return (f"# a3po compare --study token-grid: DAPO with static weight 2 on the {end}-probability 20% of the tokens "
            f"of {'positive' if polarity == 'pos' else 'negative'} responses\nrl:\n  algorithm: dapo\n  shaper: "
            f"{{name: token_weighted, metric: prob, polarity: {polarity}, end: {end}, ratio: 0.2, scale: 2.0}}\n")


def _pn(p: int, n: int) -> str:
    return (f"# a3po compare --study pn-ratio: DAPO with positive advantages x {p}, negative advantages x {n}\nrl:\n"
            f"  algorithm: dapo\n  advantage: {{name: polarity_weighted, pos_weight: {p}.0, neg_weight: {n}.0}}\n")


def _raises(name: str, baseline: str, sign: int, why: str) -> Claim:
    verb = "raises" if sign > 0 else "lowers"
    return Claim(f"{name} {verb} entropy vs {baseline} ({why})", name, "entropy_mean", sign, baseline)


STUDIES = {
    "polarity": StudySpec(
        algorithms=("psr", "nsr", "dapo", "a3po"), baseline="dapo",
        claims=(Claim("PSR's entropy falls fastest (lowest late/early entropy ratio)", "psr", "entropy_ratio", -1),
                Claim("NSR keeps the highest late entropy", "nsr", "entropy_late", +1),
                Claim("A3PO's early entropy is above DAPO's", "a3po", "entropy_early", +1, "dapo"),
                Claim("A3PO's final validation avg@k is above DAPO's", "a3po", "val_avg_final", +1, "dapo"))),
    "token-grid": StudySpec(
        algorithms=("dapo", "pos_low", "pos_high", "neg_low", "neg_high"), baseline="dapo",
        overlays={f"{p}_{e}": _token_cell(p, e) for p in ("pos", "neg") for e in ("low", "high")},
        claims=(_raises("pos_low", "dapo", +1, "boosting unlikely tokens of correct answers"),
                _raises("neg_high", "dapo", +1, "pushing down likely tokens of wrong answers"),
                _raises("pos_high", "dapo", -1, "boosting likely tokens of correct answers"),
                _raises("neg_low", "dapo", -1, "pushing down unlikely tokens of wrong answers"))),
    "pn-ratio": StudySpec(
        algorithms=("P1N1", "P2N1", "P1N2", "P2N2"), baseline="P1N1",
        overlays={f"P{p}N{n}": _pn(p, n) for p, n in ((1, 1), (2, 1), (1, 2), (2, 2))},
        claims=(_raises("P2N1", "P1N1", -1, "weighting positive samples sharpens"),
                _raises("P1N2", "P1N1", +1, "weighting negative samples keeps exploring"),
                Claim("P1N2's entropy is above P2N1's", "P1N2", "entropy_mean", +1, "P2N1"))),
}
DEFAULT_STUDY = "polarity"
