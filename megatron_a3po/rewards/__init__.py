"""Verifiable rewards: math (math-verify, DAPO "Answer:" / \\boxed), synthetic arithmetic, custom functions.

Every math verification runs in a worker process under a hard timeout (see `timeout.py`). `RewardError`
(a ValueError) means rewards cannot be trusted: stop rather than train on them. `check_reward_fn(name)` is
the pre-flight check.
"""

from megatron_a3po.rewards.math_reward import compute_score, extract_answer, overlong_penalty, score_batch
from megatron_a3po.rewards.registry import RewardFunction, check_reward_fn, get_reward_fn
from megatron_a3po.rewards.synthetic import arithmetic_reward, make_arithmetic_dataset
from megatron_a3po.rewards.timeout import (RewardError, RewardFunctionError, RewardTimeout, RewardWorkerError,
                                           WorkerPool, get_default_pool, run_with_timeout)

__all__ = [
    "compute_score", "extract_answer", "overlong_penalty", "score_batch", "RewardFunction", "get_reward_fn",
    "check_reward_fn", "RewardError",
    "arithmetic_reward", "make_arithmetic_dataset", "RewardFunctionError", "RewardTimeout", "RewardWorkerError",
    "WorkerPool", "get_default_pool", "run_with_timeout",
]
