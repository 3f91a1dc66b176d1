"""a3po-convert verify: the same token batch through HF transformers and the converted Megatron model.

The HF reference runs first (in the launching process, or on rank 0 under torchrun) and is freed before the
Megatron model is built, so the two models are never in memory at once. The Megatron forward goes through
megatron-core's own pipeline schedule at the requested TP/PP; its vocab-parallel logits are gathered over TP
and only the first `vocab_size` columns are compared: Megatron's output layer has extra zero-padded rows
(vocab padded to a multiple of make-vocab-size-divisible-by x TP) that HF does not have.
"""

from __future__ import annotations

from pathlib import Path

from checkpoints_tools.common import ConvertError, Launcher, build_sharded_model, check_parallel_sizes, dtype_flag
from megatron_a3po.dtypes import dtype_name

EXIT_ABOVE_TOLERANCE = 3


def sample_tokens(vocab_size: int, batch: int, seq: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, seq), generator=g)  # id 0 is often padding: leave it out


def hf_logits(hf_path: str, tokens, dtype):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=dtype)
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
    del model
    return logits


def _megatron_logits_rank(ckpt: str, tp: int, pp: int, tokens, dtype_str: str):
    """Collective; returns [b, s, vocab_size] fp32 logits on global rank 0, None elsewhere."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_a3po import platform
    from megatron_a3po.models import megatron_ckpt

    meta = megatron_ckpt.read_meta(ckpt)
    arch = meta.arch
    padded = megatron_ckpt.load_padded_vocab(meta, tp)
    chunks = build_sharded_model(arch, tp, pp, dtype_flag(dtype_str), padded)
    megatron_ckpt.load_model(chunks, ckpt, arch)
    for chunk in chunks:
        chunk.eval()
    device = platform.device()
    batch, seq = tokens.shape
    collected = []

    def forward_step(data_iterator, model):
        ids = next(data_iterator).to(device)
        positions = torch.arange(seq, device=device).unsqueeze(0).expand_as(ids)
        output = model(ids, positions, None)  # [b, s, padded_vocab / tp]

        def keep_logits(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits) if tp > 1 else logits
            collected.append(full[..., : arch.vocab_size].float().cpu())  # padded vocab columns dropped
            return logits.new_zeros(()), {}

        return output, keep_logits

    data = [iter([tokens]) for _ in chunks] if len(chunks) > 1 else iter([tokens])
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=chunks,
                                    num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True)
    owner = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    mine = collected[0] if owner else None
    if dist.get_world_size() == 1:
        return mine
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return next(x for x in gathered if x is not None) if dist.get_rank() == 0 else None


def compare(reference, candidate) -> dict:
    diff = (candidate - reference).abs()
    top1 = (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1_agreement": top1}


def verify(args) -> int:
    from megatron_a3po.models import megatron_ckpt
    from megatron_a3po.models.families import load_hf_arch

    hf_path, ckpt = Path(args.hf_path), Path(args.megatron_path)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if not (hf_path / "config.json").is_file():
        raise ConvertError(f"--hf-path {hf_path}: no config.json there; point it at a Hugging Face model dir")
    hf_arch, _ = load_hf_arch(hf_path)
    meta = megatron_ckpt.read_meta(ckpt)
    differences = megatron_ckpt.arch_differences(hf_arch, meta.arch, "--hf-path config.json",
                                                 f"--megatron-path {megatron_ckpt.METADATA_FILE}")
    if differences:
        raise ConvertError("the HF model and the Megatron checkpoint describe different models: "
                           + "; ".join(differences) + ". Point --hf-path at the model the checkpoint came from")
    check_parallel_sizes(meta.arch, tp, pp)
    if args.seq_length > meta.arch.max_position_embeddings or args.seq_length < 1 or args.batch_size < 1:
        raise ConvertError(f"--seq-length must be in 1..{meta.arch.max_position_embeddings} and --batch-size >= 1")
    dtype = dtype_flag(args.dtype)
    launcher = Launcher(tp, pp)
    tokens = sample_tokens(meta.arch.vocab_size, args.batch_size, args.seq_length, args.seed)
    reference = hf_logits(str(hf_path), tokens, dtype) if launcher.is_main else None
    logits = launcher.run(_megatron_logits_rank, (str(ckpt), tp, pp, tokens, dtype_name(dtype)))
    verdict = None
    if launcher.is_main:
        stats = compare(reference, logits)
        ok = stats["max_abs"] <= args.tolerance
        padded = megatron_ckpt.load_padded_vocab(meta, tp)
        print(f"verify ({dtype_name(dtype)}, TP={tp} PP={pp}): {args.batch_size} x {args.seq_length} random tokens; "
              f"logits compared on the first {meta.arch.vocab_size} vocab columns only (Megatron's output layer "
              f"has {padded} rows; the {padded - meta.arch.vocab_size} vocab-padding columns are not compared)")
        print(f"max abs logit diff {stats['max_abs']:.3e}  mean abs logit diff {stats['mean_abs']:.3e}  "
              f"top-1 agreement {100 * stats['top1_agreement']:.1f}%  tolerance {args.tolerance:.1e}  "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
        verdict = 0 if ok else EXIT_ABOVE_TOLERANCE
    return launcher.share(verdict)
