"""Supervised warm start with the same model/parallel code: cross-entropy on response tokens only.

    torchrun --nproc-per-node 2 -m megatron_a3po.sft --hf-path BASE_HF --tensor-model-parallel-size 2 \
        --sft-output OUT_HF [--sft-steps 300] [--lr 1e-3]

Trains on the synthetic arithmetic task (`prompt` -> `ground_truth` then end-of-turn) and writes the policy as an
HF checkpoint (config.json, model.safetensors, tokenizer) that `a3po-convert hf-to-megatron` takes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megatron_a3po import config as C
from megatron_a3po.flag_parser import FlagParser


def _examples(tokenizer, rows, scratchpad_fraction: float | None = None,
              seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end-of-turn) per row; the response is the direct answer or, for a seeded
    `scratchpad_fraction` of rows (None: the level's default, 0.5 on level 6, else 0), the worked one."""
    from megatron_a3po.rewards.synthetic import sft_responses

    responses = sft_responses(rows, scratchpad_fraction, seed=seed)
    return [(tokenizer.encode(r["prompt"], add_special_tokens=False),
             tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
            for r, text in zip(rows, responses)]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _batch(examples, pad_id: int) -> dict:
    width = max(len(p) + len(a) for p, a in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, (p, a) in enumerate(examples):
        tokens[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p): len(p) + len(a)] = True
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask[:, 1:]}


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=__doc__)
    parser.add_argument("--sft-output", required=True, help="HF directory to write the warm-started policy to")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-level", type=int, default=1, help="arithmetic difficulty level")
    parser.add_argument("--sft-scratchpad-fraction", type=_fraction, default=None,
                        help="share of examples answered with the worked scratchpad instead of directly "
                             "(default: 0.5 on level 6, 0 elsewhere; only additions have one)")
    parser.add_argument("--sft-examples", type=int, default=2000, help="distinct training examples")
    C.add_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_a3po.errors import ConfigError, UserError, report
    from megatron_a3po.job import resolve_job, world_size_from_env

    try:
        cfg = C.apply_flags(C.Config(), args)
        if not cfg.model.hf_path:
            raise ConfigError("--hf-path is required (the base HF model to warm-start)")
        if args.sft_steps < 1:
            raise ConfigError(f"--sft-steps must be >= 1, got {args.sft_steps}")
        job = resolve_job(cfg, world_size_from_env(), rl=False)
    except UserError as err:
        return report(err, "config error")
    return run(job, args)


def run(job, args) -> int:
    from transformers import AutoTokenizer

    from megatron_a3po import parallel
    from megatron_a3po.hf_export import export_hf
    from megatron_a3po.logprobs import vocab_parallel_logprobs
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.rewards.synthetic import make_arithmetic_dataset

    cfg, arch, hf_cfg = job.cfg, job.arch, job.model.hf_config
    t = cfg.training
    parallel.init_model_parallel(job.layout.sizes(), seed=t.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    policy = PolicyModel(cfg, arch)
    policy.load_hf(cfg.model.hf_path)
    examples = _examples(tokenizer, make_arithmetic_dataset(args.sft_examples, args.sft_level, seed=t.seed + 1),
                         args.sft_scratchpad_fraction, seed=t.seed + 2)
    gen = torch.Generator().manual_seed(t.seed)
    say = print if parallel.is_rank0() else (lambda *a, **k: None)
    for step in range(1, args.sft_steps + 1):
        picked = torch.randint(len(examples), (t.global_batch_size,), generator=gen).tolist()
        batch = _batch([examples[i] for i in picked], tokenizer.pad_token_id)
        share = slice(parallel.dp_rank() * (len(picked) // parallel.dp_size()),
                      (parallel.dp_rank() + 1) * (len(picked) // parallel.dp_size()))
        total = batch["mask"].sum().item()
        micro = [{k: v[share][i: i + t.micro_batch_size] for k, v in batch.items()}
                 for i in range(0, len(picked) // parallel.dp_size(), t.micro_batch_size)]

        def loss_fn(logits, mb):
            lp = vocab_parallel_logprobs(logits, mb["targets"], parallel.tp_group(), vocab_size=arch.vocab_size).logprobs
            nll = -(lp * mb["mask"]).sum()
            return nll / total, {"nll": nll.detach()}

        outs = policy.forward_backward(micro, loss_fn)
        stats = policy.optimizer_step()
        # every TP rank of each DP replica's last stage holds its sum; others add 0
        nll = parallel.all_reduce_scalar(sum(o["nll"] for o in outs) if outs else 0.0)
        if step % 25 == 0 or step == 1:
            say(f"[sft] step {step}/{args.sft_steps} loss {nll / total / parallel.tp_size():.4f} "
                f"grad_norm {stats['grad_norm']:.3f}", flush=True)
    export_hf(policy, hf_cfg, Path(cfg.model.hf_path), Path(args.sft_output))
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
