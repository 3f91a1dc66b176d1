"""Task kinds and their verifiers: math (math-verify), multiple choice (answer letter), code (stdin/stdout tests in
the sandbox). Each turns a model response into 1.0 (correct) or 0.0.

Prompts: math uses DAPO-Math's instruction (the paper's training format: reasoning, then "Answer: X" on the last
line; a \\boxed{X} answer is accepted too), multiple choice asks for "Answer: LETTER", code asks for one
```python block that reads stdin and writes stdout (LiveCodeBench's format).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from megatron_a3po.errors import ConfigError
from megatron_a3po.evaluation.sandbox import SandboxLimits, run_python

KINDS = ("math", "multiple_choice", "code")
KIND_ALIASES = {"math": "math", "multiple_choice": "multiple_choice", "mc": "multiple_choice",
                "choice": "multiple_choice", "gpqa": "multiple_choice", "code": "code", "lcb": "code"}

MATH_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    "Remember to put your answer on its own line after \"Answer:\".")
CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the form "
    "Answer: $LETTER (without quotes) where LETTER is one of {letters}. Think step by step before answering."
    "\n\n{question}\n\n{options}")
CODE_TEMPLATE = (
    "You will be given a question (problem specification) and will generate a correct Python program that "
    "matches the specification and passes all tests.\n\nQuestion: {question}\n\nRead the inputs from stdin, "
    "solve the problem and write the answer to stdout (do not directly test on the sample inputs). Enclose "
    "your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```")


@dataclass
class EvalItem:
    """One benchmark question. `truth`: the answer (math), the correct letter after shuffling (multiple
    choice), or a list of {"input", "output"} tests (code)."""

    kind: str
    prompt: str | list[dict]
    truth: Any
    source: str = ""  # "file row i", for errors and per-item results
    options: list[str] = field(default_factory=list)  # multiple choice: as shown (shuffled)
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def ground_truth(self) -> Any:  # the name data.PromptItem uses, so both kinds of item work in the runner
        return self.truth


def kind_of(name: str) -> str:
    kind = KIND_ALIASES.get(name.strip().lower())
    if kind is None:
        raise ConfigError(f"unknown task kind {name!r}; use one of {', '.join(KIND_ALIASES)}")
    return kind


# ---- multiple choice --------------------------------------------------------------------------------------------

_CHOICE_PATTERNS = [  # most explicit first; within a pattern the last match wins
    r"(?i:answer)\s*(?:(?i:is)|:)?\s*[:\-]?\s*[*$]*\s*(?:\\boxed\{\s*)?(?:\\text\{\s*)?\(?\s*([A-Z])\b",
    r"\\boxed\{\s*(?:\\text\{\s*)?\(?([A-Z])\)?\s*\}?\s*\}",
    r"\(([A-Z])\)",
    r"(?<![A-Za-z])([A-Z])(?![A-Za-z])",
]


def extract_choice(text: str, letters: str) -> str | None:
    """The chosen letter: "Answer: C", "the answer is (C)", "\\boxed{C}", "(C)", else the last standalone
    capital letter that is an option. Only the tail is searched (the answer comes last)."""
    tail = text[-4000:]
    for pattern in _CHOICE_PATTERNS:
        found = [m.group(1) for m in re.finditer(pattern, tail) if m.group(1) in letters]
        if found:
            return found[-1]
    return None


def score_choice(text: str, item: EvalItem) -> float:
    letters = "".join(chr(ord("A") + i) for i in range(len(item.options)))
    return 1.0 if extract_choice(text, letters) == item.truth else 0.0


# ---- code ---------------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last ```python block (else the last ``` block of any language); None when there is none."""
    blocks = [(m.group(1), m.group(2)) for m in _FENCE_RE.finditer(text)]
    python = [code for lang, code in blocks if lang]
    chosen = python or [code for _, code in blocks]
    return chosen[-1] if chosen else None


def outputs_match(got: str, expected: str, tol: float = 1e-6) -> bool:
    """Line by line with surrounding whitespace ignored; numbers may differ by `tol` (relative or absolute)."""
    a = [line.strip() for line in got.strip().splitlines()]
    b = [line.strip() for line in expected.strip().splitlines()]
    if a == b:
        return True
    if len(a) != len(b):
        return False
    for la, lb in zip(a, b):
        ta, tb = la.split(), lb.split()
        if len(ta) != len(tb):
            return False
        for x, y in zip(ta, tb):
            if x == y:
                continue
            try:
                fx, fy = float(x), float(y)
            except ValueError:
                return False
            if abs(fx - fy) > tol * max(1.0, abs(fy)):
                return False
    return True


def run_tests(code: str, tests: Sequence[dict], limits: SandboxLimits | None = None) -> dict:
    """Run `code` on every test until the first failure. {"passed": bool, "tests_passed", "status"}."""
    for i, test in enumerate(tests):
        result = run_python(code, test["input"], limits)
        if not result.ok:
            return {"passed": False, "tests_passed": i, "status": result.status}
        if not outputs_match(result.stdout, test["output"]):
            return {"passed": False, "tests_passed": i, "status": "wrong_answer"}
    return {"passed": True, "tests_passed": len(tests), "status": "ok"}


def score_code(text: str, item: EvalItem, limits: SandboxLimits | None = None) -> float:
    code = extract_code(text)
    return 1.0 if code is not None and run_tests(code, item.truth, limits)["passed"] else 0.0


# ---- all kinds ----------------------------------------------------------------------------------------------------

def score_responses(kind: str, texts: Sequence[str], items: Sequence[Any], *,
                    reward_fn: Callable | None = None, limits: SandboxLimits | None = None,
                    max_parallel: int = 2, progress: Callable[[int], None] | None = None) -> list[float]:
    """1.0/0.0 per response; texts[i] answers items[i]. Math uses `reward_fn.batch` when given (the trainer's
    reward, e.g. the synthetic task) and math-verify otherwise; code runs at most `max_parallel` sandboxes."""
    if len(texts) != len(items):
        raise ValueError(f"{len(texts)} responses for {len(items)} items")
    kind = kind_of(kind)
    if kind == "math":
        if reward_fn is None:
            from megatron_a3po.rewards import get_reward_fn

            reward_fn = get_reward_fn("math")
        scores = [1.0 if r > 0 else 0.0 for r in reward_fn.batch(list(texts), [str(it.ground_truth) for it in items])]
        if progress:
            progress(len(texts))
        return scores
    if kind == "multiple_choice":
        scores = [score_choice(t, it) for t, it in zip(texts, items)]
        if progress:
            progress(len(texts))
        return scores

    def one(pair):
        value = score_code(pair[0], pair[1], limits)
        if progress:
            progress(1)
        return value

    with ThreadPoolExecutor(max(1, max_parallel), thread_name_prefix="a3po-sandbox") as ex:
        return list(ex.map(one, zip(texts, items)))
