"""Synthetic arithmetic task family (generator + verifier) for the CPU demo and tests.

Made for a tiny character-level model: prompts are bare expressions ending in "=" ("3+4=") and the answer is
the integer ("7"), stated alone or after a worked scratchpad (below), read from the response text before the
first newline or end token. Levels:

  1  single-digit addition           3+4=        (answers 0..18)
  2  two-digit addition              23+45=
  3  two-digit subtraction           23-45=      (answers may be negative)
  4  multiplication                  7*12=       (one digit times up to two digits)
  5  multi-term                      12+7-30=, 4*6+13=   (three terms, usual precedence)
  6  addition, length is a choice    47+38=      (level 2's prompts; answered directly or worked out)

Pass a list of levels to mix them uniformly. Rows are deterministic by seed.

Worked answers (level 6's point; the verifier accepts them on any level). A response may state the integer
directly ("85") or first work the sum out column by column, ones first, on the same line (a newline ends the
response): each column is "x+y=s" or, with the carry from the column before, "x+y+1=s" (a missing digit is 0),
columns are joined by ",", and ";" separates the scratchpad from the final answer:

  47+38=   ->  85   or   7+8=15,4+3+1=8;85
  85+47=   ->  132  or   5+7=12,8+4+1=13;132
  347+86=  ->  433  or   7+6=13,4+8+1=13,3+0+1=4;433   (any width: a missing digit is 0)

Verifier rules (`parse_arithmetic_answer`), on the text before the first newline/end token, stripped:
  - no ";": the whole text must be one integer (unchanged from levels 1-5);
  - one ";": the text before it must be well-formed column steps (1-32 of them, the grammar above, nothing
    else: no spaces, no empty steps) and the text after it one integer, which is the answer;
  - anything else (garbage steps, no final answer, two ";", trailing junk after the answer) states no answer
    and scores 0.
Only the final answer is graded, as in the paper's verifiers: the step arithmetic is not checked, so a correct
answer after a wrong scratchpad scores 1 (and a wrong answer after a correct one scores 0). Before level 6 a
response containing ";" always scored 0; now a well-formed worked answer is graded on every level, because the
reward sees only (response, ground truth). `answer_form` tells the forms apart for metrics. With the tiny
character tokenizer (one token per character) a level-6 response is 3-4 tokens direct and 15-20 worked, end
token included: give RL a max response length of at least 20. Level 6 keeps to two-digit operands so that a tiny
model learns it in a CPU-sized SFT (`a3po compare`'s warm start: 300 steps of the 50/50 mix): on 256 held-out sums
its greedy answers are right 93% of the time when worked out and 5% when direct, so RL has a reason to make
responses longer (sampled at temperature 1: 56% and 4%).

`worked_solution(row)` writes a row's worked answer and `sft_responses` the SFT targets (a seeded mix of
direct and worked answers: `SFT_SCRATCHPAD_FRACTION`, 0.5 on level 6 and 0 elsewhere, unless given).
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
    6: "two-digit addition, answered directly or worked out by columns",
}
SFT_SCRATCHPAD_FRACTION = {6: 0.5}  # default share of worked SFT answers per level (others: 0)
SCRATCHPAD_SEP, STEP_SEP = ";", ","
END_MARKERS = ("\n", "<|im_end|>", "</s>", "<|endoftext|>")
_INT_RE = re.compile(r"[+-]?\d{1,32}")
_STEP = r"\d\+\d(?:\+1)?=\d{1,2}"  # one column: digit + digit [+ carry] = its sum
_WORKED_RE = re.compile(rf"(?:{_STEP},){{0,31}}{_STEP};([+-]?\d{{1,32}})")
_ADDITION_PROMPT_RE = re.compile(r"(\d{1,32})\+(\d{1,32})=")


def _expression(level: int, rng: random.Random) -> tuple[str, int]:
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}", a + b
    if level in (2, 6):  # level 6 has level 2's sums; what differs is the SFT mix (SFT_SCRATCHPAD_FRACTION)
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


def _answer_line(solution: str) -> str:
    cut = len(solution)
    for marker in END_MARKERS:
        i = solution.find(marker, 0, cut)
        if i != -1:
            cut = i
    return solution[:cut].strip()


def parse_arithmetic_answer(solution: str) -> int | None:
    """The integer the response states (see the module docstring's verifier rules), else None.

    Its text before the first newline/end token, stripped, is either one integer or a well-formed worked
    scratchpad, ";", and one integer; the steps' arithmetic is not checked.
    """
    text = _answer_line(solution)
    if SCRATCHPAD_SEP in text:
        worked = _WORKED_RE.fullmatch(text)
        return int(worked.group(1)) if worked else None
    if not _INT_RE.fullmatch(text):
        return None
    return int(text)


def answer_form(solution: str) -> str:
    """"direct", "worked" or "malformed" (states no answer): which form the response's answer line takes."""
    if parse_arithmetic_answer(solution) is None:
        return "malformed"
    return "worked" if SCRATCHPAD_SEP in _answer_line(solution) else "direct"


def worked_solution(row: dict | str) -> str:
    """The worked answer to an addition row (or its prompt): "47+38=" -> "7+8=15,4+3+1=8;85".

    Columns ones first, each "x+y=s" or "x+y+1=s" with the carry (a missing digit is 0); after ";" the sum, i.e.
    the last column's sum followed by the earlier columns' last digits, last column first. A pure function.
    """
    prompt = row["prompt"] if isinstance(row, dict) else row
    match = _ADDITION_PROMPT_RE.fullmatch(prompt)
    if not match:
        raise ValueError(f"no worked form for {prompt!r}: only additions 'a+b=' of non-negative integers "
                         "(levels 1, 2, 6) have one")
    a, b = match.groups()
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    steps, carry = [], 0
    for x, y in zip(reversed(a), reversed(b)):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = total // 10
    return STEP_SEP.join(steps) + SCRATCHPAD_SEP + str(int(a) + int(b))


def sft_responses(rows: list[dict], scratchpad_fraction: float | None = None, seed: int = 0) -> list[str]:
    """Each row's SFT response text: its worked answer with probability `scratchpad_fraction`, else the bare
    ground truth. None takes each row's level default (`SFT_SCRATCHPAD_FRACTION`: 0.5 on level 6, else 0).

    One draw per row from Random(seed) whatever the fraction, so the same seed picks the same rows.
    """
    if scratchpad_fraction is not None and not 0.0 <= scratchpad_fraction <= 1.0:
        raise ValueError(f"scratchpad fraction must be in [0, 1], got {scratchpad_fraction}")
    rng = random.Random(seed)
    out = []
    for row in rows:
        fraction = (SFT_SCRATCHPAD_FRACTION.get(row.get("level"), 0.0) if scratchpad_fraction is None
                    else scratchpad_fraction)
        if fraction > 0 and not _ADDITION_PROMPT_RE.fullmatch(row["prompt"]):
            raise ValueError(f"scratchpad fraction {fraction} asks for worked answers, but {row['prompt']!r} "
                             "(level {}) is not an addition; use levels 1, 2 or 6, or fraction 0"
                             .format(row.get("level")))
        out.append(worked_solution(row) if rng.random() < fraction else str(row["ground_truth"]))
    return out


def arithmetic_reward(solution: str, ground_truth: str) -> float:
    """1.0 if the integer the response states (directly, or after a worked scratchpad and ";") is
    `ground_truth`, else 0.0."""
    answer = parse_arithmetic_answer(solution)
    if answer is None:
        return 0.0
    try:
        expected = int(str(ground_truth).strip())
    except ValueError as exc:
        raise ValueError(f"arithmetic ground truth must be an integer string, got {ground_truth!r}") from exc
    return 1.0 if answer == expected else 0.0
