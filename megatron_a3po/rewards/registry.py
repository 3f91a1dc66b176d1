"""Reward functions by name ("math", "math_dapo", "math_boxed", "arithmetic") or by "module:function".

Every reward is `fn(solution: str, ground_truth: str) -> float`, wrapped in a `RewardFunction` that also
offers `.batch(solutions, ground_truths)`. A custom "module:function" is imported here first (so a typo fails
at startup, not at the first rollout) and then runs in a reward worker process under the same hard timeout as
math verification; a timeout scores `timeout_reward` (default 0.0), an exception inside it is raised loudly.

`load_reward_fn(name)` resolves a job's --reward with a one-line error (--dry-run). `check_reward_fn(name)` is
the pre-flight: it builds the reward and scores one example in the real worker pool, raising `RewardError` with
the cause and the fix if it cannot.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from megatron_a3po.rewards import math_reward
from megatron_a3po.rewards.synthetic import answer_form, arithmetic_reward
from megatron_a3po.rewards.timeout import (DEFAULT_TIMEOUT_S, RewardError, RewardFunctionError, RewardTimeout,
                                           RewardWorkerError, WorkerPool, get_default_pool, import_fix)

BUILTIN = ("math", "math_dapo", "math_boxed", "arithmetic")
MATH_FORMATS = {"math": "auto", "math_dapo": "dapo", "math_boxed": "boxed"}
CHECK_TIMEOUT_S = 30.0  # generous: the first verification in a fresh worker also loads the LaTeX grammar


class RewardFunction:
    """Callable `(solution, ground_truth) -> float` plus `batch(...) -> list[float]`, and the task's optional
    per-response labels (`labels(solutions)`: e.g. the arithmetic task's answer form, direct or worked), whose
    shares the trainer logs as `task/<label>_share`. A custom reward declares a labeller as an attribute of its
    function: `my_reward.response_label = lambda solution: "boxed" if "\\boxed" in solution else "plain"`."""

    def __init__(self, name: str, fn: Callable[[str, str], float], parallel: bool,
                 batch_fn: Callable[..., list[float]] | None = None, labeller: Callable[[str], str] | None = None):
        self.name, self._fn, self._parallel, self._batch_fn = name, fn, parallel, batch_fn
        self._labeller = labeller

    @property
    def has_labels(self) -> bool:
        return self._labeller is not None

    def labels(self, solutions: Sequence[str]) -> list[str] | None:
        """Each response's task label, or None when the task defines none."""
        if self._labeller is None:
            return None
        labels = [self._labeller(s) for s in solutions]
        bad = [v for v in labels if not isinstance(v, str) or not v]
        if bad:
            raise TypeError(f"reward {self.name!r}: its response_label returned {bad[0]!r}; it must return a "
                            "non-empty str per response")
        return labels

    def __call__(self, solution: str, ground_truth: str) -> float:
        value = self._fn(solution, ground_truth)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"reward function {self.name!r} returned {value!r}; it must return a finite float")
        return float(value)

    def batch(self, solutions: Sequence[str], ground_truths: Sequence[str], max_parallel: int = 4) -> list[float]:
        if len(solutions) != len(ground_truths):
            raise ValueError(f"{len(solutions)} solutions but {len(ground_truths)} ground truths")
        if self._batch_fn is not None:  # math: counts worker failures and raises RewardError past the limit
            return self._batch_fn(solutions, ground_truths, max_parallel=max_parallel)
        if not self._parallel or len(solutions) <= 1 or max_parallel <= 1:
            return [self(s, g) for s, g in zip(solutions, ground_truths)]
        with ThreadPoolExecutor(min(max_parallel, len(solutions)), thread_name_prefix="a3po-reward") as ex:
            return list(ex.map(self, solutions, ground_truths))

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"


def _import_target(path: str):
    from megatron_a3po.hooks import import_callable

    return import_callable(path, "custom reward")


def get_reward_fn(name_or_path: str, *, timeout: float = DEFAULT_TIMEOUT_S, pool: WorkerPool | None = None,
                  timeout_reward: float = 0.0, in_worker: bool = True) -> RewardFunction:
    """Resolve a reward by built-in name or "module:function".

    timeout applies to the math rewards and to custom functions run in a worker (in_worker=True);
    in_worker=False calls a custom function directly in this process (no timeout: only for trusted, fast code).
    """
    if name_or_path in MATH_FORMATS:
        fmt = MATH_FORMATS[name_or_path]

        def score(solution: str, ground_truth: str) -> float:
            return math_reward.compute_score(solution, ground_truth, format=fmt, timeout=timeout, pool=pool)

        def batch(solutions: Sequence[str], ground_truths: Sequence[str], max_parallel: int) -> list[float]:
            return math_reward.score_batch(solutions, ground_truths, format=fmt, timeout=timeout, pool=pool,
                                           max_parallel=max_parallel)

        return RewardFunction(name_or_path, score, parallel=True, batch_fn=batch)
    if name_or_path == "arithmetic":
        return RewardFunction(name_or_path, arithmetic_reward, parallel=False, labeller=answer_form)
    if ":" not in name_or_path:
        raise ValueError(f"unknown reward {name_or_path!r}; use one of {BUILTIN} or 'package.module:function'")
    fn = _import_target(name_or_path)
    labeller = getattr(fn, "response_label", None)  # labels run here, in the trainer: they are cheap string tests
    if not in_worker:
        return RewardFunction(name_or_path, fn, parallel=False, labeller=labeller)

    def remote(solution: str, ground_truth: str) -> float:
        try:
            return (pool or get_default_pool()).call(name_or_path, (solution, ground_truth), timeout)
        except RewardTimeout:
            return timeout_reward

    return RewardFunction(name_or_path, remote, parallel=True, labeller=labeller)


def load_reward_fn(name: str) -> RewardFunction:
    """get_reward_fn for a job's --reward, before the job starts (--dry-run, pre-flight): an unknown name, a
    module:function that does not import, or a math reward without math-verify is a RewardError naming --reward
    and the fix (the job itself would meet it only after building its model and starting vLLM)."""
    import importlib.util

    try:
        fn = get_reward_fn(name)
    except RewardError:
        raise
    except ValueError as exc:  # unknown name, or the module / attribute does not import
        message = str(exc)
        if "use one of" not in message and "PYTHONPATH" not in message:  # those name their fix already
            message += f"; pass a built-in name ({', '.join(BUILTIN)}) or an importable package.module:function"
        raise RewardError(f"--reward {name}: {message}") from None
    if name in MATH_FORMATS and importlib.util.find_spec("math_verify") is None:
        raise RewardError(f"--reward {name} needs math-verify, which is not installed; `uv sync` or "
                          "`pip install 'math-verify[antlr4_13_2]'`")
    return fn


def check_reward_fn(name: str, *, example: tuple[str, str] | None = None, timeout: float = CHECK_TIMEOUT_S,
                    pool: WorkerPool | None = None) -> None:
    """Pre-flight: build reward `name` and score one example in the real worker pool; RewardError if it cannot.

    Math rewards must judge "\\frac{1}{2}" equal to "0.5" through math-verify in a worker (catches math-verify
    missing or without its LaTeX parser); a custom "module:function" must return a finite number for `example`
    (default ("1", "1")) in a worker. Starts the pool's workers as a side effect (paying their imports up front).
    """
    try:
        fn = get_reward_fn(name, timeout=timeout, pool=pool)
    except RewardError:
        raise
    except ValueError as exc:  # unknown name, or the module does not import in the trainer
        raise RewardError(f"reward {name!r} cannot be built: {exc}") from exc
    if name == "arithmetic":
        if fn("7", "7") != 1.0:
            raise RewardError("the arithmetic reward scored '7' vs '7' as wrong; fix megatron_a3po.rewards.synthetic")
        return
    pool = (pool or get_default_pool()).start()
    if name in MATH_FORMATS:
        target, args = f"{math_reward.__name__}:verify_equivalent", ["\\frac{1}{2}", "0.5"]
    else:
        target, args = name, list(example or ("1", "1"))
    what = f"reward {name!r}: {target}{tuple(args)} in a reward worker"
    try:
        result = pool.call(target, args, timeout)
    except RewardTimeout as exc:
        raise RewardError(f"{what} did not finish within {timeout:g} s; the machine is overloaded or the function "
                          "hangs. Fix: free CPUs for the reward workers, or make the function faster") from exc
    except RewardWorkerError as exc:  # includes RewardFunctionError: the function raised
        fix = import_fix(str(exc)) or "read the worker's error above in the log"
        raise RewardError(f"{what} failed: {exc}. Fix: {fix}") from exc
    if name in MATH_FORMATS:
        if result is not True:
            raise RewardError(f"{what} returned {result!r}, not True: math-verify cannot parse LaTeX here (its "
                              "antlr4 runtime is missing or the wrong version). Fix: `pip install "
                              "'math-verify[antlr4_13_2]'`, or `uv sync`")
        score = fn.batch(["Answer: \\boxed{\\frac{1}{2}}"], ["0.5"])[0]
        if score != 1.0:
            raise RewardError(f"reward {name!r} scored a correct answer as {score}; a bug in "
                              "megatron_a3po.rewards.math_reward")
    elif not isinstance(result, (int, float)) or not math.isfinite(result):  # bool is fine (an int)
        raise RewardError(f"{what} returned {result!r}; a reward function must return a finite float. "
                          "Fix the function")
