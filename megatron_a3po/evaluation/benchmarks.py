"""Benchmark files (parquet / jsonl) -> EvalItems, with schema checks that name the file, the row and the fix.

The task kind of a file: the `NAME=FILE:KIND` suffix, else a `task` column (one kind per file), else inferred
from the first row's columns (tests -> code, options/choices or GPQA's "Correct Answer" -> multiple_choice,
answer/ground_truth -> math). Schemas (see docs/evaluation.md):
  math             problem | question | prompt (used verbatim, str or chat messages);  answer | ground_truth |
                   reward_model.ground_truth
  multiple_choice  question;  options | choices (2-26 strings) + answer (letter or 0-based index), or GPQA's
                   "Question", "Correct Answer", "Incorrect Answer 1..3"
  code             question | question_content | problem;  tests | public_test_cases (+ private_test_cases):
                   a list (or JSON string) of {"input": str, "output": str}
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_a3po.data import DatasetError, read_rows
from megatron_a3po.errors import ConfigError
from megatron_a3po.evaluation.tasks import (CHOICE_TEMPLATE, CODE_TEMPLATE, MATH_TEMPLATE, EvalItem, kind_of)

SCHEMA_HINT = "see docs/evaluation.md for the expected columns"


@dataclass
class Benchmark:
    name: str
    path: str
    kind: str
    items: list[EvalItem]
    skipped: int = 0


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """"NAME=FILE" or "NAME=FILE:KIND" -> (name, file, kind or None)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(f"--benchmark {spec!r}: expected NAME=FILE or NAME=FILE:KIND, e.g. aime24=aime24.jsonl:math")
    path, kind = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and tail.lower() in ("math", "multiple_choice", "mc", "choice", "gpqa", "code", "lcb"):
        path, kind = head, kind_of(tail)
    return name, path, kind


def infer_kind(row: dict) -> str:
    if row.get("task"):
        return kind_of(str(row["task"]))
    if any(k in row for k in ("tests", "public_test_cases", "private_test_cases", "input_output")):
        return "code"
    if any(k in row for k in ("options", "choices", "Correct Answer")):
        return "multiple_choice"
    if any(k in row for k in ("answer", "ground_truth", "reward_model")):
        return "math"
    raise ValueError(f"cannot tell the task kind from the columns {sorted(row)[:12]}; add a 'task' column or "
                     "write --benchmark NAME=FILE:KIND with KIND math, multiple_choice or code")


def _text(row: dict, keys: tuple[str, ...], what: str) -> str:
    for k in keys:
        value = row.get(k)
        if isinstance(value, str) and value.strip():
            return value
    raise ValueError(f"missing {what}: expected a non-empty string in one of {', '.join(map(repr, keys))}")


def math_item(row: dict, where: str) -> EvalItem:
    rm = row.get("reward_model")
    answer = row.get("answer", row.get("ground_truth", rm.get("ground_truth") if isinstance(rm, dict) else None))
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise ValueError("missing answer: expected 'answer', 'ground_truth' or 'reward_model.ground_truth' "
                         "(a string or a number)")
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   and isinstance(m.get("role"), str) for m in prompt):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]  # already formatted (DAPO files)
    elif isinstance(prompt, str) and prompt.strip() and not any(k in row for k in ("problem", "question")):
        pass  # a formatted prompt string, used verbatim
    else:
        prompt = MATH_TEMPLATE.format(problem=_text(row, ("problem", "question", "Problem"), "problem text"))
    return EvalItem("math", prompt, str(answer).strip(), where)


def choice_item(row: dict, where: str, seed: int) -> EvalItem:
    question = _text(row, ("question", "Question", "problem"), "question")
    if "Correct Answer" in row:  # GPQA's own columns
        options = [row.get("Correct Answer")] + [row.get(f"Incorrect Answer {i}") for i in (1, 2, 3)]
        correct = 0
    else:
        options = row.get("options", row.get("choices"))
        if isinstance(options, dict):  # {"A": ..., "B": ...}
            options = [options[k] for k in sorted(options)]
        answer = row.get("answer")
        if isinstance(answer, bool) or answer is None:
            raise ValueError("missing 'answer': the correct option's letter ('C') or 0-based index (2)")
        if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
            correct = ord(answer.strip().upper()) - ord("A")
        elif isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
            correct = int(answer)
        else:
            raise ValueError(f"'answer' must be a letter ('C') or a 0-based index (2), got {answer!r:.40}")
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= 26 \
            or not all(isinstance(o, (str, int, float)) and str(o).strip() for o in options):
        raise ValueError("'options' (or 'choices') must be a list of 2 to 26 non-empty strings")
    if not 0 <= correct < len(options):
        raise ValueError(f"answer points at option {correct} but there are {len(options)} options")
    # Shuffled with a seed derived from the question, so every run (and every model) sees the same order.
    order = list(range(len(options)))
    key = hashlib.sha256(f"{seed}:{question}".encode()).hexdigest()
    random.Random(int(key[:16], 16)).shuffle(order)
    shown = [str(options[i]).strip() for i in order]
    letters = "".join(chr(ord("A") + i) for i in range(len(shown)))
    listing = "\n".join(f"{letters[i]}) {text}" for i, text in enumerate(shown))
    prompt = CHOICE_TEMPLATE.format(letters=letters, question=question.strip(), options=listing)
    return EvalItem("multiple_choice", prompt, letters[order.index(correct)], where, options=shown)


def _tests(value: Any, column: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"'{column}' is a string but not JSON (LiveCodeBench's private tests are compressed: "
                             "decode them with the conversion snippet in docs/evaluation.md)") from None
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:  # APPS/TACO {"inputs", "outputs"}
        value = [{"input": i, "output": o} for i, o in zip(value["inputs"], value["outputs"])]
    if not isinstance(value, list):
        raise ValueError(f"'{column}' must be a list of {{'input': str, 'output': str}}")
    tests = []
    for j, t in enumerate(value):
        if not isinstance(t, dict) or not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
            raise ValueError(f"'{column}' test {j} must be {{'input': str, 'output': str}}, got {t!r:.60}")
        if t.get("testtype", "stdin") != "stdin":
            raise ValueError(f"'{column}' test {j} has testtype {t['testtype']!r}; only stdin/stdout tests are "
                             "supported (keep LiveCodeBench rows whose tests are all 'stdin')")
        tests.append({"input": t["input"], "output": t["output"]})
    return tests


def code_item(row: dict, where: str) -> EvalItem:
    question = _text(row, ("question", "question_content", "problem", "prompt"), "question")
    tests = []
    for column in ("tests", "public_test_cases", "private_test_cases", "input_output"):
        if row.get(column) not in (None, "", []):
            tests += _tests(row[column], column)
    if not tests:
        raise ValueError("no tests: expected 'tests' (or LiveCodeBench's 'public_test_cases') as a list of "
                         "{'input': str, 'output': str}")
    return EvalItem("code", CODE_TEMPLATE.format(question=question.strip()), tests, where)


def load_benchmark(name: str, path: str | Path, kind: str | None = None, *, seed: int = 0,
                   skip_bad_rows: bool = False, limit: int | None = None) -> Benchmark:
    """Read and check every row; a bad row raises DatasetError naming file, row, problem and fix (or is skipped
    and counted with skip_bad_rows)."""
    path = str(path)
    if not Path(path).is_file():
        raise DatasetError(f"benchmark {name}: file {path} does not exist; pass --benchmark NAME=FILE with a local "
                           ".jsonl or .parquet file (docs/evaluation.md shows how to make one)")
    unit = "row" if path.endswith(".parquet") else "line"
    items, skipped = [], 0
    for i, row in read_rows(path):
        where = f"{path} {unit} {i if unit == 'row' else i + 1}"
        try:
            if not isinstance(row, dict):
                raise ValueError(getattr(row, "problem", None) or f"row is a {type(row).__name__}, expected an object")
            # Inferred from the first good row; later rows are checked against that kind's schema.
            row_kind = kind or (items[0].kind if items and row.get("task") is None else infer_kind(row))
            if row.get("task") is not None and kind_of(str(row["task"])) != (kind or row_kind):
                raise ValueError(f"'task' is {row['task']!r} but this benchmark is {kind or row_kind}; use one "
                                 "task kind per file")
            item = (math_item(row, where) if row_kind == "math" else code_item(row, where) if row_kind == "code"
                    else choice_item(row, where, seed))
            if items and item.kind != items[0].kind:
                raise ValueError(f"task kind {item.kind} differs from the file's first row ({items[0].kind}); "
                                 "use one task kind per file")
        except ValueError as exc:
            if not skip_bad_rows:
                raise DatasetError(f"benchmark {name}: {where}: {exc}; fix the row ({SCHEMA_HINT}) or pass "
                                   "--skip-bad-rows to skip and count bad rows") from None
            skipped += 1
            continue
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise DatasetError(f"benchmark {name}: {path} has no usable rows ({skipped} bad); {SCHEMA_HINT}")
    return Benchmark(name, path, items[0].kind, items, skipped)
