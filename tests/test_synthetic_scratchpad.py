"""Level 6 of the synthetic task: addition answered directly or after a worked column scratchpad."""

from __future__ import annotations

import statistics

import pytest

from megatron_a3po.rewards import arithmetic_reward, get_reward_fn, make_arithmetic_dataset
from megatron_a3po.rewards.synthetic import (SFT_SCRATCHPAD_FRACTION, answer_form, parse_arithmetic_answer,
                                             sft_responses, worked_solution)


def test_level6_rows_are_deterministic_and_in_range():
    rows = make_arithmetic_dataset(400, 6, seed=5)
    assert rows == make_arithmetic_dataset(400, 6, seed=5)
    assert rows != make_arithmetic_dataset(400, 6, seed=6)
    carries = 0
    for row in rows:
        assert row["level"] == 6 and row["data_source"] == "arithmetic" and row["prompt"].endswith("=")
        a, b = row["prompt"][:-1].split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and str(int(a)) == a and str(int(b)) == b
        assert row["ground_truth"] == str(int(a) + int(b))
        carries += int(a[-1]) + int(b[-1]) >= 10
    assert 120 < carries < 240  # the ones column carries in 45% of the sums: both step forms are common
    # the same sums as level 2 (what level 6 adds is the worked form in the SFT mix)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in make_arithmetic_dataset(400, 2, seed=5)]


def test_existing_levels_rows_unchanged_by_level6():
    # a level list without 6 draws exactly as before; the reference rows were written by the pre-level-6 code
    assert [r["prompt"] for r in make_arithmetic_dataset(3, 1, seed=0)] == ["6+6=", "0+4=", "8+7="]
    assert [r["prompt"] for r in make_arithmetic_dataset(3, 2, seed=0)] == ["59+63=", "15+43=", "75+72="]


@pytest.mark.parametrize("prompt, worked", [
    ("47+38=", "7+8=15,4+3+1=8;85"),
    ("347+86=", "7+6=13,4+8+1=13,3+0+1=4;433"),
    ("85+47=", "5+7=12,8+4+1=13;132"),
    ("999+999=", "9+9=18,9+9+1=19,9+9+1=19;1998"),
    ("12+34=", "2+4=6,1+3=4;46"),
    ("3+4=", "3+4=7;7"),
])
def test_worked_solution_format(prompt, worked):
    assert worked_solution(prompt) == worked == worked_solution({"prompt": prompt, "ground_truth": "x"})


def test_both_forms_verify_and_every_generated_worked_solution_is_correct():
    for row in make_arithmetic_dataset(2000, 6, seed=0) + make_arithmetic_dataset(200, [1, 2], seed=0):
        worked, gt = worked_solution(row), row["ground_truth"]
        assert arithmetic_reward(gt, gt) == 1.0 and answer_form(gt) == "direct"
        assert arithmetic_reward(worked, gt) == 1.0 and answer_form(worked) == "worked"
        assert arithmetic_reward(worked + "<|im_end|>", gt) == 1.0
        assert arithmetic_reward(worked + "\nmore text", gt) == 1.0
        assert arithmetic_reward(worked, str(int(gt) + 1)) == 0.0
        # the steps themselves are right: each column's digits, carry and sum
        carry = 0
        a, b = (x.zfill(3) for x in row["prompt"][:-1].split("+"))
        steps = worked.split(";")[0].split(",")
        for i, step in enumerate(steps):
            x, y = a[-1 - i], b[-1 - i]
            total = int(x) + int(y) + carry
            assert step == f"{x}+{y}{'+1' if carry else ''}={total}"
            carry = total // 10
    assert get_reward_fn("arithmetic").batch(["7+8=15,4+3+1=8;85", "85", "8+7=15;85;85"], ["85"] * 3) == [1, 1, 0]


def test_final_answer_only_is_graded():
    # a wrong scratchpad with the right answer counts (final answer only, like the paper's verifiers) ...
    assert arithmetic_reward("1+1=2,4+3+1=9;85", "85") == 1.0
    # ... and a right scratchpad with a wrong answer does not
    assert arithmetic_reward("7+8=15,4+3+1=8;86", "85") == 0.0
    assert parse_arithmetic_answer(" 7+8=15,4+3+1=8;85 ") == 85
    assert parse_arithmetic_answer("7+8=15;-3") == -3


@pytest.mark.parametrize("bad", [
    "7+8=15,4+3+1=8;",          # missing final answer
    "7+8=15,4+3+1=8",           # no separator: not an integer
    ";85",                      # empty scratchpad
    "7+8=15,4+3+1=8;;85",       # two separators
    "7+8=15;4+3+1=8;85",        # two separators
    "7+8=15,4+3+1=8;85x",       # trailing junk after the answer
    "7+8=15,4+3+1=8;85 9",      # two numbers after the separator
    "7+8=15,,4+3+1=8;85",       # empty step
    "7+8=15,4+3+1=8,;85",       # trailing step separator
    "7+8=15, 4+3+1=8;85",       # spaces inside
    "7+8=15,4+3+2=8;85",        # the carry is +1 or absent
    "17+8=25;85",               # a column holds one digit
    "7+8=150;85",               # a column's sum has at most 2 digits
    "7-8=15;85",                # only +
    "hello;85",                 # garbage
    "85;85",                    # a number is not a step
    "7+8=15;8.5",               # the answer is an integer
    "\n7+8=15;85",              # nothing before the first newline
    "7+8=15,4+3+1=8" * 40 + ";85",  # past 32 steps
])
def test_malformed_scratchpads_score_zero(bad):
    assert parse_arithmetic_answer(bad) is None
    assert arithmetic_reward(bad, "85") == 0.0 and answer_form(bad) == "malformed"


def test_sft_mix_is_seeded_and_defaults_by_level():
    rows = make_arithmetic_dataset(1000, 6, seed=1)
    mixed = sft_responses(rows, seed=7)
    assert mixed == sft_responses(rows, seed=7) and mixed != sft_responses(rows, seed=8)
    worked = [r for r in mixed if ";" in r]
    assert SFT_SCRATCHPAD_FRACTION[6] == 0.5 and 400 < len(worked) < 600
    for row, text in zip(rows, mixed):
        assert text in (row["ground_truth"], worked_solution(row))
        assert arithmetic_reward(text, row["ground_truth"]) == 1.0
    assert sft_responses(rows, 0.0) == [r["ground_truth"] for r in rows]
    assert sft_responses(rows, 1.0) == [worked_solution(r) for r in rows]
    easy = make_arithmetic_dataset(50, 1, seed=1)
    assert sft_responses(easy) == [r["ground_truth"] for r in easy]  # other levels: direct answers only
    with pytest.raises(ValueError, match="not an addition"):
        sft_responses(make_arithmetic_dataset(5, 3, seed=1), 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        sft_responses(rows, 1.5)
    with pytest.raises(ValueError, match="no worked form"):
        worked_solution("7*12=")


def test_sft_examples_and_flag():
    from megatron_a3po import sft
    from megatron_a3po.models.tiny import build_tokenizer

    tok = build_tokenizer()
    rows = make_arithmetic_dataset(200, 6, seed=2)
    examples = sft._examples(tok, rows, None, seed=3)
    texts = sft_responses(rows, None, seed=3)
    for (prompt_ids, response_ids), row, text in zip(examples, rows, texts):
        assert tok.decode(prompt_ids) == row["prompt"] and response_ids[-1] == tok.eos_token_id
        assert tok.decode(response_ids[:-1]) == text
    assert sft._fraction("0.25") == 0.25
    for bad in ("-0.1", "1.01", "nan"):
        with pytest.raises(Exception, match="must be in"):
            sft._fraction(bad)


def test_characters_in_tiny_vocab_and_response_lengths():
    from megatron_a3po.models.tiny import build_tokenizer

    tok = build_tokenizer()
    vocab = tok.get_vocab()
    rows = make_arithmetic_dataset(2000, 6, seed=0)
    direct = [r["ground_truth"] for r in rows]
    worked = [worked_solution(r) for r in rows]
    for text in [r["prompt"] for r in rows] + direct + worked:
        assert set(text) <= set(vocab), text
    unk = tok.unk_token_id
    lengths = {}
    for name, texts in (("direct", direct), ("worked", worked)):
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        assert all(unk not in x and len(x) == len(t) for x, t in zip(ids, texts))  # one token per character
        n = [len(x) + 1 for x in ids]  # + end-of-turn
        lengths[name] = (min(n), statistics.median(n), max(n))
    assert lengths["direct"] == (3, 4, 4)  # "20".."198" + end
    lo, med, hi = lengths["worked"]
    assert lo == 15 and 16 <= med <= 18 and hi == 20  # "1+2=3,1+3=4;43" .. "9+9=18,9+9+1=19;198", + end
    assert max(len(r["prompt"]) for r in rows) <= 8  # fits the demo's max_prompt_length 16
