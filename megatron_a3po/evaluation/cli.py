"""`a3po eval`: evaluate an HF checkpoint on local benchmark files with vLLM (avg@n, pass@k, lengths).

--tensor-parallel-size K > 1 re-launches this command under `torchrun --standalone --nproc-per-node K`
(vLLM's external_launcher needs one process per TP rank); rank 0 scores, prints and writes the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_a3po.errors import ConfigError, UserError, report
from megatron_a3po.flag_parser import FlagParser


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory (config, safetensors, tokenizer)")
    p.add_argument("--benchmark", action="append", required=True, metavar="NAME=FILE[:KIND]",
                   help="repeatable; KIND = math | multiple_choice | code (else from a 'task' column or the schema)")
    p.add_argument("--n", type=int, default=8, help="samples per question (avg@n, pass@k for k = 1, 2, 4, .., n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None, help="default: longest prompt + max-new-tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and multiple-choice shuffle seed")
    p.add_argument("--prompt-format", choices=("auto", "chat", "raw"), default="auto",
                   help="chat: tokenizer chat template; raw: the prompt text as is (base models); auto: chat if the "
                        "tokenizer has a template")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each benchmark (quick checks)")
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--code-timeout", type=float, default=10.0, help="wall seconds per test run")
    p.add_argument("--code-memory-mb", type=int, default=1024)
    p.add_argument("--code-parallel", type=int, default=2, help="sandboxes running at once")
    p.add_argument("--allow-weak-sandbox", action="store_true",
                   help="run code benchmarks even where the kernel gives no filesystem confinement or network "
                        "isolation (recorded in the results; docs/evaluation.md)")
    p.add_argument("--cpu-kv-cache-gb", type=int, default=4)
    p.add_argument("--output", required=True, help="results JSON (summary, per-item scores, samples)")
    p.add_argument("--no-progress", action="store_true")


def run(argv: list[str]) -> int:
    """`a3po eval ARGS...`"""
    parser = FlagParser(prog="a3po eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv), argv)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.tensor_parallel_size < 1:
        print("error: --tensor-parallel-size must be >= 1", file=sys.stderr)
        return 2
    if args.tensor_parallel_size > 1 and "WORLD_SIZE" not in os.environ:
        # "--": torchrun's argparse would otherwise take abbreviations like `--n` as (ambiguous) options of its own.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.tensor_parallel_size}", "-m", "megatron_a3po.evaluation.cli", "--", *argv]
        os.execv(sys.executable, cmd)  # not reached
    if args.tensor_parallel_size > 1 and int(os.environ["WORLD_SIZE"]) != args.tensor_parallel_size:
        print(f"error: --tensor-parallel-size {args.tensor_parallel_size} but WORLD_SIZE={os.environ['WORLD_SIZE']}; "
              "launch with --nproc-per-node equal to the TP size (or let `a3po eval` launch itself)", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except UserError as err:  # flags, benchmark files, a machine that cannot sandbox code
        return report(err)


def _run(args) -> int:
    from megatron_a3po.evaluation.benchmarks import load_benchmark, parse_spec
    from megatron_a3po.evaluation.sandbox import SandboxLimits, describe, require_confinement

    if args.no_progress:
        os.environ["A3PO_PROGRESS"] = "0"  # every bar: scoring, and vLLM's generation (metrics.progress_enabled)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ConfigError(f"--model {args.model} has no config.json; pass a Hugging Face checkpoint directory")
    limits = SandboxLimits(timeout_s=args.code_timeout, memory_mb=args.code_memory_mb,
                           allow_weak=args.allow_weak_sandbox)
    limits.validate()
    benches = []
    for spec in args.benchmark:
        name, path, kind = parse_spec(spec)
        if any(b.name == name for b in benches):
            raise ConfigError(f"benchmark name {name!r} given twice; names key the results")
        benches.append(load_benchmark(name, path, kind, seed=args.seed, skip_bad_rows=args.skip_bad_rows,
                                      limit=args.limit))
    sandbox = None
    if any(b.kind == "code" for b in benches):  # refuse before loading the model, not after generating
        sandbox = require_confinement(args.allow_weak_sandbox)
        print(f"[eval] {describe(sandbox)}", file=sys.stderr, flush=True)

    from transformers import AutoTokenizer

    from megatron_a3po import parallel
    from megatron_a3po.data import tokenize_prompt
    from megatron_a3po.evaluation.metrics import macro_average
    from megatron_a3po.evaluation.report import markdown_table, write_json
    from megatron_a3po.evaluation.runner import run_benchmark
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.rollout.sampling import SamplingConfig

    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    sampling.validate(prefix="")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = args.prompt_format == "raw" or (args.prompt_format == "auto" and not getattr(tokenizer, "chat_template", None))
    for bench in benches:
        for item in bench.items:
            item.prompt_ids = tokenize_prompt(tokenizer, item.prompt, raw_prompt=raw)
    longest = max(len(it.prompt_ids) for b in benches for it in b.items)
    max_model_len = args.max_model_len or longest + args.max_new_tokens
    if longest + args.max_new_tokens > max_model_len:
        raise ConfigError(f"the longest prompt has {longest} tokens; --max-model-len {max_model_len} leaves less than "
                         f"--max-new-tokens {args.max_new_tokens}; raise --max-model-len or lower --max-new-tokens")
    parallel.init_distributed()
    rank0 = parallel.is_rank0()
    try:
        engine = RolloutEngine(args.model, rollout_tp=args.tensor_parallel_size, max_model_len=max_model_len,
                               seed=args.seed, dtype=args.dtype, load_format="auto",
                               cpu_kv_cache_gb=args.cpu_kv_cache_gb)
        results, summaries = {}, {}
        for bench in benches:
            start = time.monotonic()
            if rank0:
                print(f"[eval] {bench.name}: {len(bench.items)} {bench.kind} items x {args.n} samples",
                      file=sys.stderr, flush=True)
            out = run_benchmark(engine, tokenizer, bench, sampling, limits=limits, max_parallel=args.code_parallel,
                                score_here=rank0)
            if rank0:
                out["summary"]["seconds"] = round(time.monotonic() - start, 2)
                results[bench.name], summaries[bench.name] = out, out["summary"]
        if rank0:
            average = macro_average(summaries)
            write_json(args.output, {
                "model": os.path.abspath(args.model), "sampling": vars(sampling), "average": average,
                "benchmarks": results, "sandbox": sandbox,
            })
            print(markdown_table(summaries, average))
            if sandbox:
                print(f"\n{describe(sandbox)}")
            print(f"results: {args.output}", file=sys.stderr)
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":  # torchrun entry point for --tensor-parallel-size > 1
    raise SystemExit(run(sys.argv[1:]))
