"""Reward functions by name ("math", "math_dapo", "math_boxed", "arithmetic") or by "module:function".

Every reward is `fn(solution: str, ground_truth: str) -> float`, wrapped in a `RewardFunction` that also
offers `.batch(solutions, ground_truths)`. A custom "module:function" is imported here first (so a typo fails
at startup, not at the first rollout) and then runs in a reward worker process under the same hard timeout as
math verification; a timeout scores `timeout_reward` (default 0.0), an exception inside it is raised loudly.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from megatron_a3po.rewards import math_reward
from megatron_a3po.rewards.synthetic import arithmetic_reward
from megatron_a3po.rewards.timeout import DEFAULT_TIMEOUT_S, RewardTimeout, WorkerPool, get_default_pool

BUILTIN = ("math", "math_dapo", "math_boxed", "arithmetic")


class RewardFunction:
    """Callable `(solution, ground_truth) -> float` plus `batch(...) -> list[float]`."""

    def __init__(self, name: str, fn: Callable[[str, str], float], parallel: bool):
        self.name, self._fn, self._parallel = name, fn, parallel

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
    if name_or_path in ("math", "math_dapo", "math_boxed"):
        fmt = {"math": "auto", "math_dapo": "dapo", "math_boxed": "boxed"}[name_or_path]

        def score(solution: str, ground_truth: str) -> float:
            return math_reward.compute_score(solution, ground_truth, format=fmt, timeout=timeout, pool=pool)

        return RewardFunction(name_or_path, score, parallel=True)
    if name_or_path == "arithmetic":
        return RewardFunction(name_or_path, arithmetic_reward, parallel=False)
    if ":" not in name_or_path:
        raise ValueError(f"unknown reward {name_or_path!r}; use one of {BUILTIN} or 'package.module:function'")
    fn = _import_target(name_or_path)
    if not in_worker:
        return RewardFunction(name_or_path, fn, parallel=False)

    def remote(solution: str, ground_truth: str) -> float:
        try:
            return (pool or get_default_pool()).call(name_or_path, (solution, ground_truth), timeout)
        except RewardTimeout:
            return timeout_reward

    return RewardFunction(name_or_path, remote, parallel=True)
