"""Math answer reward: DAPO-Math "Answer: X" lines and `\\boxed{X}`, checked with math-verify.

The answer is extracted here in plain, linear-time Python (safe on megabyte strings); only the short
extracted answer and the ground truth go to a worker process, where math-verify parses and compares them
under a hard timeout (see `timeout.py`). Equivalent forms count: 1/2 = \\frac12 = 0.5, 5 = 5 \\text{ cm},
[1,2) intervals, sets, \\sqrt{18} = 3\\sqrt{2}. Nothing in the model text is ever `eval`-ed.

Rewards: 1/0, or +1/-1 with format="dapo" (DAPO-Math's convention). `overlong_penalty` is DAPO's
soft overlong punishment, added to the reward by the caller.

A timeout is the verdict on a pathological answer (wrong). A worker that crashes or a verifier that raises is
an infrastructure failure: one item scores as wrong, but `score_batch` raises `RewardError` when more than
`max_failure_rate` of a batch failed that way, rather than train on wrong rewards.
"""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Sequence

from megatron_a3po.rewards.timeout import (DEFAULT_TIMEOUT_S, RewardError, RewardTimeout, RewardWorkerError,
                                           WorkerPool, get_default_pool, import_fix)

logger = logging.getLogger(__name__)

Format = Literal["auto", "dapo", "boxed"]
FORMATS = ("auto", "dapo", "boxed")
MAX_ANSWER_CHARS = 1000  # longer "answers" are wrong without parsing (a real final answer is short)
MAX_NESTING = 50  # brace/paren depth beyond this is wrong without parsing
MAX_FAILURE_RATE = 0.5  # score_batch raises RewardError above this fraction of infrastructure failures

_ANSWER_RE = re.compile(r"Answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_INT_RE = re.compile(r"[+-]?\d+")
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Verdicts of worker verifications, timeouts included: a rollout group often repeats the same answer.
_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_MAX = 8192
_CACHE_LOCK = threading.Lock()


def _brace_content(text: str, start: int, limit: int) -> str | None:
    """Content of the balanced {...} group opening at text[start], or None if not closed within `limit` chars."""
    depth = 0
    for i in range(start, min(len(text), start + limit + 2)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def extract_boxed(text: str) -> tuple[str, int] | None:
    """The last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) content and its position, or None.

    Only the last one counts; if it is unbalanced or longer than MAX_ANSWER_CHARS there is no answer.
    """
    last = None
    for last in _BOXED_RE.finditer(text):
        pass
    if last is None:
        return None
    j = last.end()
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        content = _brace_content(text, j, MAX_ANSWER_CHARS)
    elif j > last.end():  # "\boxed 5": up to the next whitespace or $
        tail = re.match(r"[^\s$]{1,%d}" % MAX_ANSWER_CHARS, text[j:j + MAX_ANSWER_CHARS])
        content = tail.group(0) if tail else None
    else:
        content = None
    return None if content is None else (content, last.start())


def extract_dapo_answer(text: str) -> tuple[str, int] | None:
    """The text after the last `Answer:` (DAPO-Math prompts ask for it on the last line), or None.

    If that line holds a `\\boxed{}`, its content is the answer.
    """
    last = None
    for last in _ANSWER_RE.finditer(text):
        pass
    if last is None:
        return None
    answer = last.group(1)
    boxed = extract_boxed(answer)
    return (boxed[0] if boxed else answer), last.start()


def extract_answer(solution: str, format: Format = "auto") -> str | None:
    """The final answer in `solution` for the given format; "auto" takes whichever form comes last."""
    if format not in FORMATS:
        raise ValueError(f"unknown answer format {format!r}; choose one of {FORMATS}")
    found = []
    if format in ("dapo", "auto"):
        found.append(extract_dapo_answer(solution))
    if format in ("boxed", "auto"):
        found.append(extract_boxed(solution))
    found = [f for f in found if f is not None]
    if not found:
        return None
    answer = max(found, key=lambda f: f[1])[0]
    # Overlong text is left as is (and judged wrong): normalising megabytes would only cost time.
    return normalize_answer(answer) if len(answer) <= 4 * MAX_ANSWER_CHARS else answer


def normalize_answer(answer: str) -> str:
    """Strip whitespace, math-mode wrappers ($..$, \\(..\\)) and a trailing period."""
    answer = answer.strip()
    changed = True
    while changed:
        changed = False
        for left, right in _WRAPPERS:
            if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left):len(answer) - len(right)].strip()
                changed = True
        if answer.endswith(".") and not answer.endswith(".."):
            answer, changed = answer[:-1].rstrip(), True
    return answer


def _too_deep(text: str) -> bool:
    depth = 0
    for c in text:
        if c in "{([":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif c in "})]":
            depth -= 1
    return False


def _quick_verdict(answer: str, ground_truth: str) -> bool | None:
    """True/False when decidable without math-verify, else None."""
    if not answer or len(answer) > MAX_ANSWER_CHARS or _too_deep(answer):
        return False
    gt = normalize_answer(ground_truth)
    if answer == gt:
        return True
    if _INT_RE.fullmatch(answer) and _INT_RE.fullmatch(gt) and len(gt) <= MAX_ANSWER_CHARS:
        return int(answer) == int(gt)
    return None


def verify_equivalent(answer: str, ground_truth: str) -> bool:
    """math-verify comparison of two short answer strings. Runs INSIDE a reward worker (no own timeout).

    Only the LaTeX grammar (antlr -> sympy objects) is used; math-verify's plain-expression path, which goes
    through sympy's `parse_expr` (an `eval`), is not.
    """
    import math_verify
    from math_verify import LatexExtractionConfig, parse, verify

    # Timeouts are the worker's job (math-verify's signal.alarm would clash with it): silence its warning.
    for mod in (math_verify.parser, math_verify.grader):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def parse_latex(text: str) -> list:
        return (parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=None)
                or parse("$" + text + "$", extraction_config=config, parsing_timeout=None))

    gold, pred = parse_latex(ground_truth), parse_latex(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def compute_score(solution: str, ground_truth: str, *, format: Format = "auto", timeout: float = DEFAULT_TIMEOUT_S,
                  pool: WorkerPool | None = None) -> float:
    """1.0 if the final answer in `solution` equals `ground_truth` (math-verify equivalence), else 0.0.

    format="dapo" reads the last "Answer: X" and scores +1/-1; "boxed" reads the last \\boxed{X};
    "auto" (default) accepts either. Timeouts, worker crashes and malformed input score as wrong;
    RewardError if the worker pool cannot start. Thread-safe; the verification runs in a worker process with
    a hard `timeout` in seconds.
    """
    return _score(solution, ground_truth, format, timeout, pool)[0]


def _score(solution: str, ground_truth: str, format: Format, timeout: float,
           pool: WorkerPool | None) -> tuple[float, str | None]:
    """(reward, None) or (wrong, why the worker failed): the caller decides whether failures are too many."""
    correct, wrong = (1.0, -1.0) if format == "dapo" else (1.0, 0.0)
    if not isinstance(solution, str) or not isinstance(ground_truth, str):
        raise TypeError(f"compute_score expects str solution and ground_truth, got "
                        f"{type(solution).__name__} and {type(ground_truth).__name__}")
    answer = extract_answer(solution, format)
    if answer is None:
        return wrong, None
    quick = _quick_verdict(answer, ground_truth)
    if quick is not None:
        return (correct if quick else wrong), None
    key = (answer, ground_truth)
    with _CACHE_LOCK:
        ok = _CACHE.get(key)
    if ok is None:
        try:
            ok = bool((pool or get_default_pool()).call(f"{__name__}:verify_equivalent", key, timeout))
        except RewardTimeout:
            logger.warning("math verification timed out after %.1f s (answer %.60r); scored as wrong", timeout, answer)
            ok = False
        except RewardWorkerError as exc:  # a crashed worker: wrong, not cached (it may be transient)
            logger.warning("math verification failed (%s); scored as wrong", exc)
            return wrong, str(exc)
        with _CACHE_LOCK:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[key] = ok
    return (correct if ok else wrong), None


def score_batch(solutions: Sequence[str], ground_truths: Sequence[str], *, format: Format = "auto",
                timeout: float = DEFAULT_TIMEOUT_S, pool: WorkerPool | None = None,
                max_parallel: int | None = None, max_failure_rate: float = MAX_FAILURE_RATE) -> list[float]:
    """`compute_score` over a batch, in parallel over the worker pool (order preserved).

    Raises RewardError if the pool cannot start, or if more than `max_failure_rate` of the items failed
    because a worker crashed or the verifier raised (stopping early once that is certain).
    """
    if len(solutions) != len(ground_truths):
        raise ValueError(f"score_batch got {len(solutions)} solutions but {len(ground_truths)} ground truths")
    pool = pool or get_default_pool()
    n_threads = max(1, min(max_parallel or pool.size, len(solutions)))
    limit = max_failure_rate * len(solutions)
    failures: list[str] = []
    skipped = []
    lock, abort = threading.Lock(), threading.Event()

    def one(pair):
        if abort.is_set():
            skipped.append(1)
            return 0.0  # never returned: the batch raises
        try:
            value, failure = _score(pair[0], pair[1], format, timeout, pool)
        except BaseException:
            abort.set()
            raise
        if failure is not None:
            with lock:
                failures.append(failure)
                if len(failures) > limit:
                    abort.set()
        return value

    if n_threads == 1:
        scores = [one(p) for p in zip(solutions, ground_truths)]
    else:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="a3po-reward") as ex:
            scores = list(ex.map(one, zip(solutions, ground_truths)))
    if len(failures) > limit:
        fix = import_fix(failures[0]) or ("read the worker's error above in the log (a worker killed by SIGKILL "
                                          "ran out of memory: WorkerPool memory_limit_mb)")
        count = f"{'at least ' if skipped else ''}{len(failures)} of {len(solutions)}"
        raise RewardError(
            f"{count} rewards in this batch could not be computed (limit {max_failure_rate:.0%}) because the reward "
            f"workers are failing, e.g. {failures[0]} (pool stats {pool.stats}); they would score as wrong answers, "
            f"so the batch is refused. Fix: {fix}; check the setup with megatron_a3po.rewards.check_reward_fn")
    if failures:
        logger.warning("%d of %d rewards in this batch scored as wrong because a reward worker failed",
                       len(failures), len(solutions))
    return scores


def overlong_penalty(response_length: int, max_response_length: int, overlong_buffer_len: int,
                     penalty_factor: float = 1.0) -> float:
    """DAPO soft overlong punishment, in [-penalty_factor, 0], to ADD to the reward.

    Zero up to L_max - L_buffer tokens, then linear down to -penalty_factor at L_max (and capped there).
    """
    if max_response_length <= 0:
        raise ValueError(f"max_response_length must be > 0, got {max_response_length}")
    if not 0 < overlong_buffer_len <= max_response_length:
        raise ValueError(f"overlong_buffer_len must be in (0, max_response_length={max_response_length}], "
                         f"got {overlong_buffer_len}")
    expected = max_response_length - overlong_buffer_len
    exceed = response_length - expected
    return -min(max(exceed, 0) / overlong_buffer_len, 1.0) * penalty_factor
