"""Generate with the RolloutEngine, score with the task's verifier, summarise: one path for `a3po eval` and for
the trainer's periodic validation."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from megatron_a3po.evaluation.metrics import summarize
from megatron_a3po.evaluation.sandbox import SandboxLimits
from megatron_a3po.evaluation.tasks import score_responses
from megatron_a3po.metrics import progress


def generate(engine, tokenizer, items: Sequence[Any], sampling, step: int = 0) -> dict:
    """`sampling.n` responses per item (collective over all ranks). Returns per-item lists of texts, token
    lengths and truncation flags."""
    batch = engine.generate([list(it.prompt_ids) for it in items], sampling, tokenizer.pad_token_id, step=step)
    n = sampling.n
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in batch.responses]
    lengths = [len(r) for r in batch.responses]
    truncated = [bool(t) for t in batch.truncated.tolist()]
    return {"texts": [texts[i * n:(i + 1) * n] for i in range(len(items))],
            "lengths": [lengths[i * n:(i + 1) * n] for i in range(len(items))],
            "truncated": [truncated[i * n:(i + 1) * n] for i in range(len(items))]}


def score(generated: dict, items: Sequence[Any], task: str, *, reward_fn=None, limits: SandboxLimits | None = None,
          max_parallel: int = 2, progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Per-item lists of 1.0/0.0."""
    n = len(generated["texts"][0]) if generated["texts"] else 0
    flat_texts = [t for row in generated["texts"] for t in row]
    flat_items = [it for it in items for _ in range(n)]
    flat = score_responses(task, flat_texts, flat_items, reward_fn=reward_fn, limits=limits,
                           max_parallel=max_parallel, progress=progress)
    return [flat[i * n:(i + 1) * n] for i in range(len(items))]


def evaluate_items(engine, tokenizer, items: Sequence[Any], sampling, *, task: str = "math", reward_fn=None,
                   ks: Sequence[int] | None = None, step: int = 0, limits: SandboxLimits | None = None,
                   max_parallel: int = 2) -> dict:
    """avg@n, pass@k (k = 1, 2, 4, ..., n unless `ks`), length statistics for `items` (anything with
    `.prompt_ids` and `.ground_truth`: data.PromptItem or EvalItem). Collective: call it on every rank; every
    rank scores and returns the same numbers. `reward_fn` (a RewardFunction) overrides the math verifier."""
    if not items:
        raise ValueError("evaluate_items got no items")
    generated = generate(engine, tokenizer, items, sampling, step=step)
    correct = score(generated, items, task, reward_fn=reward_fn, limits=limits, max_parallel=max_parallel)
    return summarize(correct, generated["lengths"], generated["truncated"], ks)


def run_benchmark(engine, tokenizer, bench, sampling, *, ks=None, limits: SandboxLimits | None = None,
                  max_parallel: int = 2, score_here: bool = True) -> dict | None:
    """Generate on every rank; score and summarise where `score_here` (rank 0). Per-item details included."""
    generated = generate(engine, tokenizer, bench.items, sampling)
    if not score_here:
        return None
    bar = progress(None, f"scoring {bench.name}", total=len(bench.items) * sampling.n)
    correct = score(generated, bench.items, bench.kind, limits=limits, max_parallel=max_parallel,
                    progress=bar.update if bar else None)
    if bar:
        bar.close()
    summary = summarize(correct, generated["lengths"], generated["truncated"], ks)
    summary.update(kind=bench.kind, file=bench.path, skipped_rows=bench.skipped)
    per_item = [{"source": it.source, "correct": row, "lengths": lens}
                for it, row, lens in zip(bench.items, correct, generated["lengths"])]
    return {"summary": summary, "items": per_item, "samples": generated["texts"]}
