"""Rewards: math-verify equivalence, DAPO/boxed formats, hard timeouts in worker processes, arithmetic task."""

import os
import signal
import threading
import time

import pytest

from megatron_a3po.rewards import (RewardError, RewardFunctionError, RewardTimeout, WorkerPool, arithmetic_reward,
                                   compute_score, extract_answer, get_reward_fn, make_arithmetic_dataset,
                                   overlong_penalty, score_batch)
from megatron_a3po.rewards import math_reward
from megatron_a3po.rewards.synthetic import LEVELS, parse_arithmetic_answer

SLACK_S = 2.5  # scheduling slack on a loaded 2-core box, on top of the timeout itself


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2).start() as p:  # preloads math-verify; both workers import in parallel
        yield p


@pytest.fixture(scope="module")
def bare_pool():
    with WorkerPool(1, preload=()).start() as p:
        yield p


def _gone(pid: int) -> bool:
    """True if `pid` no longer exists (not even as a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


# (solution, ground truth, expected correct). Many go through math-verify, some take the quick path.
EQUIV = [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{-5}", "-5", True),
    ("\\boxed{-5.0}", "-5", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("\\boxed{5 \\text{ cm}}", "5", True),
    ("\\boxed{\\$5}", "5", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{[1, 2)}", "[1,2)", True),
    ("\\boxed{(-\\infty,3]}", "(-\\infty, 3]", True),
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", True),
    ("\\boxed{\\frac{\\sqrt2}{2}}", "\\sqrt{2}/2", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{\\left( \\frac12 \\right)}", "1/2", True),
    ("$\\boxed{2\\pi}$", "2\\pi", True),
    ("\\fbox{7}", "7", True),
    ("we get \\boxed 7 apples", "7", True),
    ("first \\boxed{3}, no wait: \\boxed{4}", "4", True),
    ("Answer: 0.75", "\\frac{3}{4}", True),
    ("Answer: $\\frac{3}{4}$", "0.75", True),
    ("Answer: \\boxed{12}", "12", True),
    ("Answer: 12.", "12", True),
    ("Answer: \\(1/3\\)", "\\frac{1}{3}", True),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("\\boxed{0.5}", "-\\frac{1}{2}", False),
    ("\\boxed{[1,2]}", "(1,2)", False),
    ("\\boxed{12.0001}", "12", False),
    ("\\boxed{45^\\circ}", "\\frac{\\pi}{4}", False),
    ("\\boxed{\\text{five}}", "5", False),
    ("\\boxed{4}", "3", False),
    ("\\boxed{x \\le 3}", "(-\\infty, 3]", False),
    ("\\boxed{2}", "-2", False),
    ("\\boxed{(x-1)^2}", "x^2+2x+1", False),
    ("first \\boxed{4}, no wait: \\boxed{3}", "4", False),
    ("no final answer here, it is 5", "5", False),
    ("\\boxed{5", "5", False),
    ("Answer:", "5", False),
]


@pytest.mark.parametrize("solution,ground_truth,correct", EQUIV)
def test_math_equivalence(pool, solution, ground_truth, correct):
    assert compute_score(solution, ground_truth, pool=pool) == (1.0 if correct else 0.0)


def test_enough_equivalence_cases():
    assert len(EQUIV) >= 30 and sum(c for *_, c in EQUIV) >= 15 and sum(not c for *_, c in EQUIV) >= 10


def test_dapo_format_scores_plus_minus_one(pool):
    assert compute_score("Reasoning...\nAnswer: 1/2", "0.5", format="dapo", pool=pool) == 1.0
    assert compute_score("Reasoning...\nAnswer: 3", "0.5", format="dapo", pool=pool) == -1.0
    # DAPO mode needs the "Answer:" line; a bare \boxed is a format failure.
    assert compute_score("so \\boxed{0.5}", "0.5", format="dapo", pool=pool) == -1.0
    assert compute_score("Answer: 1\nAnswer: 2", "2", format="dapo", pool=pool) == 1.0


def test_boxed_format_ignores_answer_lines(pool):
    assert compute_score("Answer: 7", "7", format="boxed", pool=pool) == 0.0
    assert compute_score("\\boxed{7}", "7", format="boxed", pool=pool) == 1.0


def test_auto_takes_the_last_stated_answer():
    assert extract_answer("Answer: 3\nthen \\boxed{4}") == "4"
    assert extract_answer("\\boxed{4}\nAnswer: 3") == "3"
    assert extract_answer("nothing") is None
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_answer("x", format="latex")


def test_score_batch_matches_single_calls_and_order(pool):
    sols = [s for s, _, _ in EQUIV[:12]] + ["\\boxed{9}"]
    gts = [g for _, g, _ in EQUIV[:12]] + ["8"]
    assert score_batch(sols, gts, pool=pool) == [compute_score(s, g, pool=pool) for s, g in zip(sols, gts)]
    assert score_batch(sols, gts, pool=pool)[-1] == 0.0
    with pytest.raises(ValueError, match="2 solutions but 1 ground truths"):
        score_batch(["a", "b"], ["a"], pool=pool)


def test_compute_score_rejects_non_strings(pool):
    with pytest.raises(TypeError, match="str solution"):
        compute_score(None, "1", pool=pool)


PATHOLOGICAL = {
    "power_tower": "\\boxed{10^{10^{10}}}",
    "power_tower_dapo": "Answer: 9^{9^{9^{9}}}",
    "factorial": "\\boxed{(10^{10})!}",
    "megabyte_answer": "Answer: " + "9" * 1_000_000,
    "megabyte_unbalanced_boxes": "\\boxed{" * 150_000,
    "megabyte_text": "x" * 1_000_000 + " \\boxed{1/0}",
    "deep_nesting_parsed": "\\boxed{" + "{" * 45 + "1" + "}" * 45 + "}",
    "deep_nesting_rejected": "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_inputs_are_wrong_within_the_timeout(pool, name):
    text = PATHOLOGICAL[name]
    for fmt, wrong in (("auto", 0.0), ("dapo", -1.0)):
        start = time.monotonic()
        assert compute_score(text, "5", format=fmt, timeout=1.0, pool=pool) == wrong
        assert time.monotonic() - start < 1.0 + SLACK_S, f"{name} ({fmt}) took {time.monotonic() - start:.1f}s"
    assert compute_score("\\boxed{5}", "5", pool=pool) == 1.0  # the pool still works


def test_timeout_from_non_main_threads(pool):
    cases = [("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "5", 0.0), ("\\boxed{\\frac{2}{4}}", "0.5", 1.0),
             ("\\boxed{(10^{9})!}", "5", 0.0), ("\\boxed{0.25}", "1/4", 1.0)]
    results = [None] * len(cases)

    def work(i):
        # the pathological cases get 1 s; the easy ones 10 s, so that a loaded machine (the full suite on 2 cores:
        # load average 20) cannot time them out, which made this test flaky
        results[i] = compute_score(cases[i][0], cases[i][1], timeout=1.0 if cases[i][2] == 0.0 else 10.0, pool=pool)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [c[2] for c in cases]
    # two pathological ones, two workers: they run side by side
    assert time.monotonic() - start < 2 * (1.0 + SLACK_S)


def test_soft_timeout_keeps_the_worker(bare_pool):
    pid = bare_pool.worker_pids()[0]
    with pytest.raises(RewardTimeout) as info:
        bare_pool.call("time:sleep", [30], timeout=0.5)
    assert not info.value.killed
    assert bare_pool.worker_pids() == [pid]
    assert bare_pool.call("operator:add", [1, 2], timeout=5) == 3


def test_hard_timeout_kills_reaps_and_replaces(bare_pool):
    """A worker stuck where the soft deadline cannot reach (here: SIGALRM ignored) is killed, reaped, replaced."""
    with pytest.raises(RewardFunctionError):  # the returned handler is not JSON: an error, but the call happened
        bare_pool.call("signal:signal", [int(signal.SIGALRM), int(signal.SIG_IGN)], timeout=5)
    [pid] = bare_pool.worker_pids()
    hard_before = bare_pool.stats["hard_timeouts"]
    start = time.monotonic()
    with pytest.raises(RewardTimeout) as info:
        bare_pool.call("time:sleep", [60], timeout=0.5)
    assert info.value.killed and time.monotonic() - start < 0.5 + SLACK_S
    assert bare_pool.stats["hard_timeouts"] == hard_before + 1
    assert _gone(pid), f"killed worker {pid} is still there (zombie or hung)"
    assert bare_pool.call("operator:add", [2, 3], timeout=30) == 5  # replacement answers (startup excluded)
    [new_pid] = bare_pool.worker_pids()
    assert new_pid != pid


def test_pool_is_thread_safe_and_errors_are_reported(bare_pool):
    out = {}

    def work(i):
        out[i] = bare_pool.call("operator:mul", [i, 3], timeout=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {i: 3 * i for i in range(16)}
    with pytest.raises(RewardFunctionError, match="ValueError"):
        bare_pool.call("builtins:int", ["not a number"], timeout=5)
    with pytest.raises(ValueError, match="module:function"):
        bare_pool.call("eval", ["1+1"], timeout=5)


def test_closed_pool_leaves_no_processes():
    p = WorkerPool(1, preload=()).start()
    assert p.call("operator:neg", [4], timeout=30) == -4
    pids = p.worker_pids()
    p.close()
    assert pids and all(_gone(pid) for pid in pids)


def test_model_text_is_never_evaluated(pool, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path('{marker}').touch()"
    for text in (f"\\boxed{{{payload}}}", f"Answer: {payload}", f"\\boxed{{1+{payload}}}"):
        assert compute_score(text, "1", pool=pool) == 0.0
    assert not marker.exists()


def test_overlong_penalty_is_dapo_linear():
    assert overlong_penalty(100, max_response_length=200, overlong_buffer_len=50) == 0.0
    assert overlong_penalty(150, 200, 50) == 0.0
    assert overlong_penalty(175, 200, 50) == pytest.approx(-0.5)
    assert overlong_penalty(200, 200, 50, penalty_factor=2.0) == pytest.approx(-2.0)
    assert overlong_penalty(500, 200, 50) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(10, 200, 0)


def test_arithmetic_dataset_is_deterministic_and_correct():
    for level in LEVELS:
        rows = make_arithmetic_dataset(50, level, seed=3)
        assert rows == make_arithmetic_dataset(50, level, seed=3)
        assert rows != make_arithmetic_dataset(50, level, seed=4)
        for row in rows:
            assert row["prompt"].endswith("=") and row["level"] == level
            expr = row["prompt"][:-1]
            assert set(expr) <= set("0123456789+-*")
            # independent check of the answer: a tiny shunting-free evaluator for + - * precedence
            total = sum(_product(term) * sign for sign, term in _terms(expr))
            assert row["ground_truth"] == str(total)
    easy = make_arithmetic_dataset(200, 1, seed=0)
    assert all(len(r["prompt"]) == 4 and 0 <= int(r["ground_truth"]) <= 18 for r in easy)
    mixed = make_arithmetic_dataset(200, [1, 3], seed=0)
    assert {r["level"] for r in mixed} == {1, 3}
    with pytest.raises(ValueError, match="unknown arithmetic level"):
        make_arithmetic_dataset(3, 9, seed=0)


def _terms(expr):
    sign, start = 1, 0
    for i, c in enumerate(expr):
        if c in "+-" and i > 0:
            yield sign, expr[start:i]
            sign, start = (1 if c == "+" else -1), i + 1
    yield sign, expr[start:]


def _product(term):
    value = 1
    for factor in term.split("*"):
        value *= int(factor)
    return value


def test_arithmetic_reward_exact_integer_first_line():
    assert arithmetic_reward("7", "7") == 1.0
    assert arithmetic_reward(" 7\nblah", "7") == 1.0
    assert arithmetic_reward("7<|im_end|>junk", "7") == 1.0
    assert arithmetic_reward("-22", "-22") == 1.0
    assert arithmetic_reward("8", "7") == 0.0
    assert arithmetic_reward("7.0", "7") == 0.0
    assert arithmetic_reward("07x", "7") == 0.0
    assert arithmetic_reward("", "7") == 0.0
    assert arithmetic_reward("\n7", "7") == 0.0
    assert arithmetic_reward("9" * 1_000_000, "7") == 0.0
    assert parse_arithmetic_answer("+12 ") == 12


def test_registry(pool, tmp_path, monkeypatch):
    assert get_reward_fn("arithmetic")("3", "3") == 1.0
    assert get_reward_fn("arithmetic").batch(["3", "4"], ["3", "3"]) == [1.0, 0.0]
    assert get_reward_fn("math", pool=pool)("\\boxed{1/2}", "0.5") == 1.0
    assert get_reward_fn("math_dapo", pool=pool)("\\boxed{1/2}", "0.5") == -1.0
    assert get_reward_fn("math_boxed", pool=pool).batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"]) == [1.0, 0.0]
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(solution, ground_truth):\n    return float(len(solution) == int(ground_truth))\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    custom = get_reward_fn("my_rewards:length_reward", pool=pool)  # runs in a worker that sees sys.path
    assert custom("abc", "3") == 1.0 and custom("ab", "3") == 0.0
    assert get_reward_fn("my_rewards:length_reward", in_worker=False)("abc", "3") == 1.0
    with pytest.raises(ValueError, match="unknown reward 'maths'"):
        get_reward_fn("maths")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        get_reward_fn("my_rewards:nope")
    with pytest.raises(ValueError, match="not a function"):
        get_reward_fn("my_rewards:NOT_CALLABLE")


def test_quick_path_needs_no_worker():
    """Integer and identical answers are decided without a worker (cheap common case)."""
    assert math_reward._quick_verdict("42", "42") is True
    assert math_reward._quick_verdict("042", "42") is True
    assert math_reward._quick_verdict("41", "42") is False
    assert math_reward._quick_verdict("1/2", "0.5") is None
    assert math_reward._quick_verdict("9" * 5000, "5") is False


def test_worker_startup_failure_is_clear():
    with WorkerPool(1, preload=("no_such_module_for_rewards",)) as p:
        with pytest.raises(RewardError, match="failed to start: ModuleNotFoundError.*Fix: make the module importable"):
            p.call("operator:add", [1, 2], timeout=5)
        with pytest.raises(RewardError, match="no_such_module_for_rewards"):  # fails fast, no respawn
            p.call("operator:add", [1, 2], timeout=5)
        assert p.worker_pids() == [] and p.stats["restarts"] == 0


def test_default_pool_is_shared():
    from megatron_a3po.rewards import get_default_pool

    first = get_default_pool()
    assert first is get_default_pool() and first.owner_pid == os.getpid()
    assert first.size >= 1
