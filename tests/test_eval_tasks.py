"""Verifiers per task kind on hand-written responses, and benchmark schema errors that name file, row and fix."""

import json

import pytest

from megatron_a3po.data import DatasetError
from megatron_a3po.evaluation.benchmarks import load_benchmark, parse_spec
from megatron_a3po.evaluation.sandbox import SandboxLimits
from megatron_a3po.evaluation.tasks import extract_choice, extract_code, outputs_match, score_responses


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_math_scoring_uses_the_math_verifier(tmp_path):
    bench = load_benchmark("m", _jsonl(tmp_path / "m.jsonl", [{"problem": "Half of one?", "answer": "\\frac{1}{2}"}]))
    item = bench.items[0]
    assert bench.kind == "math" and "Half of one?" in item.prompt and "Answer:" in item.prompt
    texts = ["so it is 0.5\nAnswer: 0.5", "\\boxed{\\frac12}", "Answer: 2", "no answer"]
    assert score_responses("math", texts, [item] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_multiple_choice_shuffle_is_seeded_and_letters_extracted(tmp_path):
    rows = [{"question": f"Q{i}", "options": ["right", "w1", "w2", "w3"], "answer": 0} for i in range(6)]
    path = _jsonl(tmp_path / "mc.jsonl", rows)
    a, b = load_benchmark("g", path, seed=0), load_benchmark("g", path, seed=0)
    assert [it.options for it in a.items] == [it.options for it in b.items]  # same order every run
    assert len({it.truth for it in a.items}) > 1  # but not always in the first position
    for it in a.items:
        assert it.options["ABCD".index(it.truth)] == "right"
        assert f"{it.truth}) right" in it.prompt
    item = a.items[0]
    wrong = next(c for c in "ABCD" if c != item.truth)
    texts = [f"Answer: {item.truth}", f"\\boxed{{{item.truth}}}", f"I think ({wrong})... no, ({item.truth}).",
             f"The answer is {wrong}", "I cannot decide"]
    assert score_responses("mc", texts, [item] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert extract_choice("Answer: E", "ABCD") is None


def test_gpqa_columns(tmp_path):
    row = {"Question": "Which?", "Correct Answer": "yes", "Incorrect Answer 1": "no", "Incorrect Answer 2": "maybe",
           "Incorrect Answer 3": "never"}
    item = load_benchmark("gpqa", _jsonl(tmp_path / "g.jsonl", [row])).items[0]
    assert item.kind == "multiple_choice" and item.options["ABCD".index(item.truth)] == "yes"


def test_code_scoring_runs_tests_in_the_sandbox(tmp_path):
    tests = json.dumps([{"input": "2 3\n", "output": "5\n", "testtype": "stdin"},
                        {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"}])
    path = _jsonl(tmp_path / "lcb.jsonl", [{"question_content": "Add two ints.", "public_test_cases": tests}])
    item = load_benchmark("lcb", path).items[0]
    assert item.kind == "code" and len(item.truth) == 2
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    half = "```python\nprint(5)\n```"
    texts = ["draft:\n```python\nprint(0)\n```\nfinal:\n" + good, half, "no code at all"]
    assert score_responses("code", texts, [item] * 3, limits=SandboxLimits(timeout_s=5)) == [1.0, 0.0, 0.0]
    assert extract_code("```py\nx\n```") == "x\n"
    assert outputs_match("1.0000001 2\n\n", "1 2") and not outputs_match("1.1 2", "1 2")


def test_spec_and_kind_inference(tmp_path):
    assert parse_spec("aime=/d/aime.jsonl:math") == ("aime", "/d/aime.jsonl", "math")
    assert parse_spec("x=C:/a.jsonl") == ("x", "C:/a.jsonl", None)
    assert parse_spec("g=g.parquet:mc")[2] == "multiple_choice"
    with pytest.raises(ValueError, match="NAME=FILE"):
        parse_spec("nofile")
    path = _jsonl(tmp_path / "t.jsonl", [{"task": "math", "question": "1+1?", "ground_truth": "2"}])
    assert load_benchmark("t", path).kind == "math"


@pytest.mark.parametrize("row,message", [
    ({"problem": "1+1?"}, "missing answer"),
    ({"question": "Q", "options": ["a"], "answer": "A"}, "2 to 26"),
    ({"question": "Q", "options": ["a", "b"], "answer": "D"}, "points at option 3"),
    ({"question": "Q", "tests": [{"input": "1", "output": "1", "testtype": "functional"}]}, "only stdin"),
    ({"question": "Q", "private_test_cases": "eJzLSM3JyQcABiwCFQ=="}, "compressed"),
    ({"foo": 1}, "cannot tell the task kind"),
])
def test_bad_rows_name_file_row_and_fix(tmp_path, row, message):
    good = {"problem": "1+1?", "answer": "2"} if "problem" in row else None
    rows = ([good] if good else []) + [row]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        load_benchmark("b", path)
    text = str(err.value)
    assert message in text and f"bad.jsonl line {len(rows)}" in text and "--skip-bad-rows" in text
    if good:
        assert load_benchmark("b", path, skip_bad_rows=True).skipped == 1


def test_missing_file_and_broken_json(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_benchmark("x", tmp_path / "nope.jsonl")
    (tmp_path / "j.jsonl").write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DatasetError, match="j.jsonl line 2: invalid JSON"):
        load_benchmark("j", tmp_path / "j.jsonl")
