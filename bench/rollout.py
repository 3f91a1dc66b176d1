"""Rollout engine speed on one rank: vLLM generation vs Hugging Face `generate`, and refit vs a plain memcpy.

(a) Both sides sample the same prompts with the same settings (temperature 1, no top-k/top-p) and never stop
    early (vLLM ignore_eos, HF min_new_tokens), so they produce exactly the same number of tokens.
(b) `RolloutEngine.refit` streams the model's HF tensors (already in memory) into vLLM; the reference copies
    the same bytes with `Tensor.copy_` into preallocated buffers.
Each side is warmed up once, then timed `--repeats` times; the median is reported.

    python bench/rollout.py
    python bench/rollout.py --prompts 16 --n 4 --max-new-tokens 32 --layers 4   # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from megatron_a3po import parallel
    from megatron_a3po.models.hf_io import HFWeights
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
    from megatron_a3po.rollout.engine import RolloutEngine

    tmp = tempfile.TemporaryDirectory()
    heads = args.hidden // 64  # head_dim 64 (vLLM's CPU attention minimum)
    hf_dir = str(write_tiny_hf_checkpoint(
        Path(tmp.name) / "m", "qwen2", seed=0, hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=2 * args.hidden, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2)))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 128, (args.prompts, args.prompt_len), generator=g)
    new_tokens = args.prompts * args.n * args.max_new_tokens
    print(f"model: qwen2 hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x n={args.n}, "
          f"prompt {args.prompt_len} + {args.max_new_tokens} new tokens; torch threads {torch.get_num_threads()}")

    parallel.init_distributed()
    engine = RolloutEngine(hf_dir, rollout_tp=1, max_model_len=args.prompt_len + args.max_new_tokens,
                           load_format="auto")

    # ---- (a) generation ----------------------------------------------------------------------------------------
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=args.max_new_tokens,
                            ignore_eos=True, seed=0)
    inputs = [{"prompt_token_ids": p} for p in prompts.tolist()]

    def vllm_generate():
        outs = engine.llm.generate(inputs, params, use_tqdm=False)
        assert sum(len(c.token_ids) for o in outs for c in o.outputs) == new_tokens

    vllm_s = median_time(vllm_generate, args.repeats)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def hf_generate():
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, num_return_sequences=args.n,
                                 min_new_tokens=args.max_new_tokens, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=0)
        assert out.shape == (args.prompts * args.n, args.prompt_len + args.max_new_tokens)

    hf_s = median_time(hf_generate, args.repeats)
    print(f"generation vLLM: {new_tokens / vllm_s:10.1f} tokens/s  ({vllm_s:.2f} s)")
    print(f"generation HF:   {new_tokens / hf_s:10.1f} tokens/s  ({hf_s:.2f} s)")
    print(f"generation speedup vLLM/HF: {hf_s / vllm_s:.2f}x  (target >= 10x)")

    # ---- (b) refit ---------------------------------------------------------------------------------------------
    weights = HFWeights(hf_dir)
    state = {name: weights.get(name) for name in weights.names()}  # in memory: time the refit, not the disk
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    buffers = {name: torch.empty_like(t) for name, t in state.items()}

    def memcpy():
        for name, t in state.items():
            buffers[name].copy_(t)

    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    before = [o.outputs[0].token_ids for o in engine.llm.generate(inputs[:4], greedy, use_tqdm=False)]
    refit_s = median_time(lambda: engine.refit(iter(state.items())), args.repeats)
    after = [o.outputs[0].token_ids for o in engine.llm.generate(inputs[:4], greedy, use_tqdm=False)]
    assert before == after, "refit with the same weights changed greedy outputs"
    copy_s = median_time(memcpy, args.repeats)
    print(f"refit:  {refit_s * 1e3:9.1f} ms for {nbytes / 2**20:.1f} MiB ({nbytes / refit_s / 2**30:.2f} GiB/s)")
    print(f"memcpy: {copy_s * 1e3:9.1f} ms for {nbytes / 2**20:.1f} MiB ({nbytes / copy_s / 2**30:.2f} GiB/s)")
    print(f"refit / memcpy: {refit_s / copy_s:.2f}x  (target <= 3x)")

    parallel.destroy()
    tmp.cleanup()


if __name__ == "__main__":
    main()
