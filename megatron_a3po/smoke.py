"""Smoke job (what `make demo` runs until the RL trainer lands): real megatron-core, tiny model, 2 ranks.

    torchrun --nproc-per-node 2 -m megatron_a3po.smoke [--tensor-model-parallel-size 2] [--tiny-model qwen2] ...

It is NOT RL training: it writes a tiny random HF checkpoint, loads it into Megatron at the requested TP/PP,
and runs a few forward/backward/Adam steps of next-token cross-entropy on one fixed batch, printing the loss
(which must fall as the model memorises the batch). Configuration errors exit non-zero before any
process group is created.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

SMOKE_DEFAULTS = ["--tiny-model", "qwen2", "--tensor-model-parallel-size", "2", "--lr", "1e-3",
                  "--train-iters", "5", "--global-batch-size", "8", "--micro-batch-size", "2"]


def main(argv: list[str] | None = None) -> int:
    from megatron_a3po import config as config_mod

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, _ = config_mod.parse_args(SMOKE_DEFAULTS + argv, description=__doc__)
        arch = _arch(cfg)
        config_mod.validate(cfg, arch=arch)
    except config_mod.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return _run(cfg, arch)


def _arch(cfg):
    from megatron_a3po.models import families, tiny

    if cfg.model.hf_path:
        return families.load_hf_arch(cfg.model.hf_path)[0]
    return families.arch_from_hf_config(tiny.hf_config(cfg.model.tiny_model).to_dict())


def _run(cfg, arch) -> int:
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_a3po import parallel
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    p, t = cfg.parallel, cfg.training
    parallel.init_model_parallel(
        parallel.ParallelSizes(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, None,
                               p.context_parallel_size), seed=t.seed)
    say = print if parallel.is_rank0() else (lambda *a, **k: None)
    say(f"[smoke] NOT RL training: a megatron-core smoke test (tiny {arch.family}, world={parallel.world_size()}, "
        f"TP={parallel.tp_size()} PP={parallel.pp_size()} DP={parallel.dp_size()}, CUDA={torch.cuda.is_available()})")
    with tempfile.TemporaryDirectory() as tmp:
        hf_path = cfg.model.hf_path
        if hf_path is None:
            hf_path = tmp if parallel.is_rank0() else None
            if parallel.is_rank0():
                write_tiny_hf_checkpoint(tmp, arch.family, seed=t.seed)
            box = [hf_path]
            dist.broadcast_object_list(box, src=0)
            hf_path = box[0]
        model = PolicyModel(cfg, arch)
        model.load_hf(hf_path)
        dist.barrier()  # rank 0's temp dir must outlive every rank's read of it
    # One fixed batch, split over DP ranks and micro-batches; loss = mean next-token CE over the global batch.
    g = torch.Generator().manual_seed(t.seed)
    tokens = torch.randint(1, arch.vocab_size, (t.global_batch_size, 33), generator=g)
    mine = tokens.chunk(parallel.dp_size())[parallel.dp_rank()]
    micro = [{"tokens": mb[:, :-1], "labels": mb[:, 1:]} for mb in mine.split(t.micro_batch_size)]
    total = tokens[:, 1:].numel()

    def loss_fn(logits, batch):
        per_token = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float().transpose(0, 1).contiguous(), batch["labels"].t().contiguous().to(logits.device))
        return per_token.sum() / total, {"loss_sum": per_token.sum().detach()}

    losses = []
    for it in range(1, t.train_iters + 1):
        start = time.perf_counter()
        out = model.forward_backward(micro, loss_fn)
        stats = model.optimizer_step()
        # every TP rank of each DP replica's last stage holds its sum; others add 0
        loss = parallel.all_reduce_scalar(sum(m["loss_sum"] for m in out) if out else 0.0) / total / parallel.tp_size()
        losses.append(loss)
        say(f"[smoke] iter {it}/{t.train_iters}  loss {loss:.4f}  grad_norm {stats['grad_norm']:.4f}  "
            f"lr {stats['lr']:.2e}  {time.perf_counter() - start:.2f}s")
    ok = losses[-1] < losses[0]
    say(f"[smoke] loss {losses[0]:.4f} -> {losses[-1]:.4f}: {'decreasing, OK' if ok else 'NOT decreasing'}")
    parallel.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
