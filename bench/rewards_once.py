"""Reward phase per rank: every rank scoring the whole gathered batch (before) vs each rank scoring its share
before the gather (now, `RolloutEngine.generate(score=...)`), side by side in one run.

Two gloo ranks, vLLM rollout TP=1 (2 rollout groups), a tiny random qwen2 model sampling 64 prompts x 4
responses of up to 48 tokens, the `math` reward (math-verify under hard timeouts). Per rank: seconds in the
reward function. Expected ratio: the number of ranks (2).

    .venv/bin/python bench/rewards_once.py
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rank(hf_dir: str) -> dict:
    from transformers import AutoTokenizer

    from megatron_a3po.rewards import get_reward_fn
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.rollout.sampling import SamplingConfig

    tok = AutoTokenizer.from_pretrained(hf_dir)
    reward_fn = get_reward_fn("math")
    prompts = [tok.encode(f"What is {i} + {i}? Answer:") for i in range(64)]
    truths = [str(2 * i) for i in range(64)]
    engine = RolloutEngine(hf_dir, rollout_tp=1, max_model_len=128, seed=0, load_format="auto")
    spent = {"share": 0.0, "scored": 0}

    def score(prompt_indices, responses):
        start = time.perf_counter()
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        rewards = reward_fn.batch(texts, [truths[i] for i in prompt_indices])
        spent["share"] += time.perf_counter() - start
        spent["scored"] += len(responses)
        return rewards

    sampling = SamplingConfig(n=4, max_new_tokens=48, seed=1)
    engine.generate(prompts[:8], sampling, tok.pad_token_id, score=score)  # warm-up (reward workers start)
    spent.update(share=0.0, scored=0)
    batch = engine.generate(prompts, sampling, tok.pad_token_id, step=1, score=score)
    start = time.perf_counter()  # before: this rank decodes and scores every response of the gathered batch
    texts = [tok.decode(r, skip_special_tokens=True) for r in batch.responses]
    whole = reward_fn.batch(texts, [truths[i // 4] for i in range(len(texts))])
    spent["whole"] = time.perf_counter() - start
    spent["same_rewards"] = whole == batch.rewards.tolist()
    spent["responses"] = len(texts)
    return spent


def main() -> None:
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
    from megatron_a3po.spawn import run_in_ranks

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(write_tiny_hf_checkpoint(pathlib.Path(tmp) / "m", "qwen2", seed=0))
        results = run_in_ranks(_rank, 2, (hf_dir,), timeout=1800, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    for rank, r in enumerate(results):
        print(f"rank {rank}: whole batch {r['whole']:.2f} s ({r['responses']} responses) vs its share "
              f"{r['share']:.2f} s ({r['scored']} responses): {r['whole'] / r['share']:.2f}x less; "
              f"same rewards: {r['same_rewards']}")


if __name__ == "__main__":
    main()
