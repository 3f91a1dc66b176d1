"""Synthetic arithmetic task family (generator + verifier) for the CPU demo and tests.

Made for a tiny character-level model: prompts are bare expressions ending in "=" ("3+4=") and the answer is
the integer alone ("7"), read from the response text before the first newline or end token. Levels:

  1  single-digit addition           3+4=        (answers 0..18)
  2  two-digit addition              23+45=
  3  two-digit subtraction           23-45=      (answers may be negative)
  4  multiplication                  7*12=       (one digit times up to two digits)
  5  multi-term                      12+7-30=, 4*6+13=   (three terms, usual precedence)

Pass a list of levels to mix them uniformly. Rows are deterministic by seed.
"""

from __future__ import annotations

import random
import re
from typing import Iterable

LEVELS = {
    1: "single-digit addition",
    2: "two-digit addition",
    3: "two-digit subtraction",
    4: "multiplication (1-digit x 2-digit)",
    5: "three terms with + - * (precedence)",
}
END_MARKERS = ("\n", "<|im_end|>", "</s>", "<|endoftext|>")
_INT_RE = re.compile(r"[+-]?\d{1,32}")


def _expression(level: int, rng: random.Random) -> tuple[str, int]:
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}", a + b
    if level == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}", a + b
    if level == 3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}-{b}", a - b
    if level == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 99)
        if rng.random() < 0.5:
            a, b = b, a
        return f"{a}*{b}", a * b
    if level == 5:
        if rng.random() < 0.5:  # a*b +- c
            a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 99)
            op = rng.choice("+-")
            return f"{a}*{b}{op}{c}", a * b + (c if op == "+" else -c)
        a, b, c = (rng.randint(1, 99) for _ in range(3))
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        value = a + (b if op1 == "+" else -b)
        value += c if op2 == "+" else -c
        return f"{a}{op1}{b}{op2}{c}", value
    raise ValueError(f"unknown arithmetic level {level!r}; choose from {sorted(LEVELS)} ({LEVELS})")


def make_arithmetic_dataset(n: int, level: int | Iterable[int] = 1, seed: int = 0) -> list[dict]:
    """`n` rows {"prompt": "3+4=", "ground_truth": "7", "level": 1, "data_source": "arithmetic"}.

    `level` is one level or a collection of levels (each row draws one uniformly). Same seed, same rows.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = [level] if isinstance(level, int) else list(level)
    if not levels:
        raise ValueError("level list is empty; pass e.g. level=1 or level=[1, 2]")
    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"unknown arithmetic level {lv!r}; choose from {sorted(LEVELS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lv = levels[0] if len(levels) == 1 else rng.choice(levels)
        expr, value = _expression(lv, rng)
        rows.append({"prompt": f"{expr}=", "ground_truth": str(value), "level": lv, "data_source": "arithmetic"})
    return rows


def parse_arithmetic_answer(solution: str) -> int | None:
    """The integer the response states: its text before the first newline/end token, stripped; else None."""
    cut = len(solution)
    for marker in END_MARKERS:
        i = solution.find(marker, 0, cut)
        if i != -1:
            cut = i
    text = solution[:cut].strip()
    if not _INT_RE.fullmatch(text):
        return None
    return int(text)


def arithmetic_reward(solution: str, ground_truth: str) -> float:
    """1.0 if the response's first line is exactly the integer `ground_truth`, else 0.0."""
    answer = parse_arithmetic_answer(solution)
    if answer is None:
        return 0.0
    try:
        expected = int(str(ground_truth).strip())
    except ValueError as exc:
        raise ValueError(f"arithmetic ground truth must be an integer string, got {ground_truth!r}") from exc
    return 1.0 if answer == expected else 0.0
