"""a3po-convert: Hugging Face <-> Megatron (dist_checkpointing) conversion, and logit-parity verification.

    a3po-convert hf-to-megatron --hf-path DIR --output DIR [--tensor-model-parallel-size N]
                                [--pipeline-model-parallel-size M] [--dtype bf16|fp16|fp32] [--overwrite]
    a3po-convert megatron-to-hf --megatron-path DIR --output DIR [--dtype ...] [--max-shard-size 5GB]
    a3po-convert verify --hf-path DIR --megatron-path DIR [--tensor-model-parallel-size N]
                        [--pipeline-model-parallel-size M] [--tolerance X]

All layouts come from megatron_a3po.models.hf_mapping (the same mapping the vLLM refit uses). Exit codes:
0 success, 1 refused input or failed conversion (nothing is left at --output), 2 bad usage, 3 verify above
tolerance. Also `python -m checkpoints_tools.convert ...`; works under torchrun too (see common.Launcher).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

from checkpoints_tools.common import (ConvertError, Launcher, atomic_output_dir, build_sharded_model,
                                      check_output_dir, check_parallel_sizes, dtype_flag, gib, max_over_ranks,
                                      peak_rss_bytes, progress)
from megatron_a3po.dtypes import dtype_name
from megatron_a3po.errors import UserError, report
from megatron_a3po.flag_parser import FlagParser


def _say(launcher: Launcher, message: str) -> None:
    if launcher.is_main:
        print(message, flush=True)


# ---- hf-to-megatron -----------------------------------------------------------------------------------------

def _open_hf(hf_path: Path):
    """Architecture + validated weights of an HF checkpoint; every problem becomes a ConvertError."""
    from megatron_a3po.models import hf_mapping
    from megatron_a3po.models.families import load_hf_arch
    from megatron_a3po.models.hf_io import HFWeights

    if not hf_path.is_dir():
        raise ConvertError(f"--hf-path {hf_path}: no such directory")
    try:
        arch, hf_config = load_hf_arch(hf_path)
    except FileNotFoundError as err:
        raise ConvertError(str(err)) from None
    except (json.JSONDecodeError, KeyError) as err:
        raise ConvertError(f"{hf_path / 'config.json'}: not a usable HF config ({err!r}); re-download it") from None
    weights = HFWeights(hf_path)
    try:
        ignorable = list(hf_mapping.IGNORABLE_HF_SUFFIXES)
        if arch.tie_word_embeddings and "lm_head.weight" in weights:
            # Some tied checkpoints still store the head; it must be the embedding, or tying would change the model.
            import torch

            if not torch.equal(weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")):
                raise ConvertError(f"{hf_path}: config.json says tie_word_embeddings=true but lm_head.weight differs "
                                   "from model.embed_tokens.weight; fix tie_word_embeddings in config.json")
            ignorable.append("lm_head.weight")
        weights.validate(hf_mapping.hf_tensor_specs(arch), ignorable=ignorable)
    except BaseException:
        weights.close()
        raise
    return arch, hf_config, weights


def _hf_to_megatron_rank(hf_path: str, out_dir: str, tp: int, pp: int, dtype_str: str, padded_vocab: int,
                         show_progress: bool) -> dict:
    from megatron_a3po import parallel
    from megatron_a3po.models import hf_mapping, megatron_ckpt
    from megatron_a3po.models.families import load_hf_arch
    from megatron_a3po.models.hf_io import HFWeights

    arch, _ = load_hf_arch(hf_path)
    chunks = build_sharded_model(arch, tp, pp, dtype_flag(dtype_str), padded_vocab)
    main = parallel.rank() == 0
    bar = progress(len(hf_mapping.hf_tensor_specs(arch)) if pp == 1 else None, "read HF", show_progress and main)
    with HFWeights(hf_path) as weights, bar:
        def read(name):
            bar.update(1)
            return weights.get(name)

        def read_into(name, out):
            bar.update(1)
            weights.read_into(name, out)

        count = hf_mapping.load_into_model(chunks, arch, read, padded_vocab, parallel.tp_rank(), parallel.tp_size(),
                                           read_hf_into=read_into)
    start = time.perf_counter()
    megatron_ckpt.save_model(chunks, out_dir)
    save_seconds = time.perf_counter() - start
    rss = max_over_ranks(peak_rss_bytes())
    return {"parameters": count, "save_seconds": save_seconds, "peak_rss": rss} if main else None


def hf_to_megatron(args) -> int:
    from megatron_a3po.models import megatron_ckpt
    from megatron_a3po.models.families import padded_vocab_size
    from megatron_a3po.models.hf_io import copy_side_files

    start = time.perf_counter()
    hf_path, output = Path(args.hf_path), Path(args.output)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    arch, hf_config, weights = _open_hf(hf_path)
    with weights:
        dtype = dtype_flag(args.dtype) or weights.dominant_dtype()
        total_bytes = weights.total_bytes()
    check_parallel_sizes(arch, tp, pp)
    check_output_dir(output, args.overwrite, [hf_path])
    padded = padded_vocab_size(arch.vocab_size, args.make_vocab_size_divisible_by, tp)
    launcher = Launcher(tp, pp)
    _say(launcher, f"hf-to-megatron: {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
                   f"{total_bytes / 1e9:.2f} GB of weights -> {dtype_name(dtype)} at TP={tp} PP={pp}; vocab "
                   f"{arch.vocab_size} padded to {padded} rows")
    with atomic_output_dir(output, launcher) as tmp:
        result = launcher.run(_hf_to_megatron_rank, (str(hf_path), str(tmp), tp, pp, dtype_name(dtype), padded,
                                                     not args.no_progress))
        if launcher.is_main:
            files = copy_side_files(hf_path, tmp / megatron_ckpt.HF_FILES_DIR)
            megatron_ckpt.CheckpointMeta(
                arch=arch, hf_config=hf_config, dtype=dtype_name(dtype), padded_vocab_size=padded,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, saved_tensor_parallel_size=tp,
                saved_pipeline_parallel_size=pp, hf_files=tuple(files),
            ).write(tmp)  # written last: a directory without it is not a checkpoint
    if launcher.is_main:
        print(f"wrote {output} ({result['parameters']} parameter tensors on rank 0; dist checkpoint save "
              f"{result['save_seconds']:.1f}s) in {time.perf_counter() - start:.1f}s; "
              f"peak RSS (largest rank) {gib(result['peak_rss'])}", flush=True)
    return 0


# ---- megatron-to-hf -----------------------------------------------------------------------------------------

def _megatron_to_hf_rank(ckpt: str, out_dir: str, tp: int, pp: int, dtype_str: str, max_shard_bytes: int,
                         show_progress: bool) -> dict:
    from megatron_a3po import parallel
    from megatron_a3po.models import hf_mapping, megatron_ckpt
    from megatron_a3po.models.hf_io import ShardedSafetensorsWriter

    meta = megatron_ckpt.read_meta(ckpt)
    arch, dtype = meta.arch, dtype_flag(dtype_str)
    padded = megatron_ckpt.load_padded_vocab(meta, tp)
    chunks = build_sharded_model(arch, tp, pp, dtype_flag(meta.dtype), padded)
    start = time.perf_counter()
    megatron_ckpt.load_model(chunks, ckpt, arch)
    load_seconds = time.perf_counter() - start
    main = parallel.rank() == 0
    specs = hf_mapping.hf_tensor_specs(arch)
    writer = ShardedSafetensorsWriter(out_dir, [(n, s, dtype) for n, s in specs], max_shard_bytes) if main else None
    with progress(len(specs), "write HF", show_progress and main) as bar:
        for name, tensor in hf_mapping.iter_hf_tensors(chunks, arch, padded, dtype=dtype):
            if writer is not None:
                writer.write(name, tensor)
            bar.update(1)
    if writer is not None:
        writer.close()
    rss = max_over_ranks(peak_rss_bytes())
    return {"files": writer.files, "load_seconds": load_seconds, "peak_rss": rss} if main else None


def export_config(meta, dtype) -> dict:
    """The source config.json, with its dtype entry changed only when the export dtype differs."""
    config = dict(meta.hf_config)
    declared = dtype_name(config.get("dtype") or config.get("torch_dtype") or "")
    if declared != dtype_name(dtype):
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = dtype_name(dtype)
    return config


def megatron_to_hf(args) -> int:
    import shutil

    from megatron_a3po.models import megatron_ckpt
    from megatron_a3po.models.hf_io import parse_size

    start = time.perf_counter()
    ckpt, output = Path(args.megatron_path), Path(args.output)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    meta = megatron_ckpt.read_meta(ckpt)
    dtype = dtype_flag(args.dtype) or dtype_flag(meta.dtype)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as err:
        raise ConvertError(f"--max-shard-size: {err}") from None
    check_parallel_sizes(meta.arch, tp, pp)
    check_output_dir(output, args.overwrite, [ckpt])
    launcher = Launcher(tp, pp)
    _say(launcher, f"megatron-to-hf: {meta.arch.family} ({meta.dtype}, saved at TP={meta.saved_tensor_parallel_size} "
                   f"PP={meta.saved_pipeline_parallel_size}) -> HF safetensors in {dtype_name(dtype)}, read at "
                   f"TP={tp} PP={pp}; vocab rows cut back to {meta.arch.vocab_size}")
    with atomic_output_dir(output, launcher) as tmp:
        result = launcher.run(_megatron_to_hf_rank, (str(ckpt), str(tmp), tp, pp, dtype_name(dtype), max_shard,
                                                     not args.no_progress))
        if launcher.is_main:
            for name in meta.hf_files:
                shutil.copy2(ckpt / megatron_ckpt.HF_FILES_DIR / name, tmp / name)
            (tmp / "config.json").write_text(json.dumps(export_config(meta, dtype), indent=2, sort_keys=True) + "\n")
    if launcher.is_main:
        print(f"wrote {output} ({len(result['files'])} safetensors file(s)) in {time.perf_counter() - start:.1f}s; "
              f"peak RSS (largest rank) {gib(result['peak_rss'])}", flush=True)
    return 0


# ---- command line -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="a3po-convert", description=__doc__.split("\n\n")[0])  # its subparsers too
    sub = parser.add_subparsers(dest="command", required=True)

    def parallel_flags(p, help_suffix):
        p.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="N", help="TP ranks " + help_suffix)
        p.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="M", help="PP ranks " + help_suffix)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    h2m = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint (+ metadata)")
    h2m.add_argument("--hf-path", required=True, help="HF model dir (config.json, safetensors, tokenizer)")
    h2m.add_argument("--output", required=True, help="new Megatron checkpoint dir")
    h2m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="stored precision (default: the HF checkpoint's own dtype, so a round trip is lossless)")
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="K",
                     help="pad the vocab to a multiple of K x TP (Megatron-LM's flag; default 128)")
    h2m.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parallel_flags(h2m, "to convert with (any TP/PP can load the result)")

    m2h = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF safetensors + config + tokenizer")
    m2h.add_argument("--megatron-path", required=True, help="dir written by hf-to-megatron (or training)")
    m2h.add_argument("--output", required=True, help="new HF model dir")
    m2h.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="exported precision (default: the checkpoint's dtype)")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    m2h.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parallel_flags(m2h, "to read the checkpoint with (spreads memory over ranks)")

    ver = sub.add_parser("verify", help="same tokens through HF transformers and Megatron; compare logits")
    ver.add_argument("--hf-path", required=True)
    ver.add_argument("--megatron-path", required=True)
    ver.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (default 1e-4)")
    ver.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32",
                     help="compute dtype of both models (default fp32, so the check measures the conversion)")
    ver.add_argument("--batch-size", type=int, default=2)
    ver.add_argument("--seq-length", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    parallel_flags(ver, "to run the Megatron model with")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (torchrun, schedulers) unwinds like Ctrl-C, so temporary output is removed.
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command == "hf-to-megatron":
            return hf_to_megatron(args)
        if args.command == "megatron-to-hf":
            return megatron_to_hf(args)
        from checkpoints_tools.verify import verify

        return verify(args)
    except UserError as err:  # ConvertError, and the model / checkpoint / config errors of megatron_a3po
        return report(err, f"a3po-convert {args.command}: error")
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # guard required: spawned ranks re-import this module
    sys.exit(main())
