"""Peak extra memory of `--export-hf` (megatron_a3po.hf_export.export_hf, streaming) vs gathering the whole
model first (what it did before), side by side in one run.

Two gloo ranks (Megatron TP=2), a qwen2-shaped model whose largest tensor is the (tied) embedding. In each
variant the model is built first, the kernel's peak-RSS counter is reset (/proc/self/clear_refs), the export
runs, and the peak resident memory above the pre-export level is reported per rank, as a multiple of the
largest HF tensor. Target (issue 12): streaming <= 2x the largest tensor beyond the model itself.

    .venv/bin/python bench/bench_export_memory.py                  # vocab 32768, hidden 512, 24 layers, fp32
    .venv/bin/python bench/bench_export_memory.py --vocab 131072 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_logprobs_memory import _status_kib  # noqa: E402 - /proc/self/status reader shared by the memory benches


def _gather_all_then_write(policy, out: pathlib.Path) -> None:
    """The previous export: every rank materialises every full tensor, rank 0 writes them in one call."""
    from safetensors.torch import save_file

    from megatron_a3po import parallel

    tensors = {name: t.clone() for name, t in policy.hf_state()}
    if parallel.is_rank0():
        out.mkdir(parents=True)
        save_file(tensors, str(out / "model.safetensors"))


def _rank(vocab: int, hidden: int, layers: int, variant: str, out_dir: str) -> dict:
    import gc

    import torch

    from megatron_a3po import config as C
    from megatron_a3po import parallel
    from megatron_a3po.hf_export import export_hf
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models import families, hf_mapping, tiny

    parallel.init_model_parallel(parallel.ParallelSizes(tensor=2), seed=0)
    hf_cfg = tiny.hf_config("qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers).to_dict()
    arch = families.arch_from_hf_config(hf_cfg)
    cfg = C.Config()
    cfg.parallel.tensor_model_parallel_size = 2
    policy = PolicyModel(cfg, arch, with_optimizer=False)
    largest = max(torch.Size(s).numel() for _, s in hf_mapping.hf_tensor_specs(arch)) * policy.dtype.itemsize
    model_bytes = sum(p.numel() * p.element_size() for c in policy.chunks for p in c.parameters())
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    out = pathlib.Path(out_dir) / f"{variant}_{parallel.rank()}"
    if variant == "streaming":
        export_hf(policy, hf_cfg, None, out)
    else:
        _gather_all_then_write(policy, out)
    extra = (_status_kib("VmHWM") - before) * 1024
    return {"rank": parallel.rank(), "extra_bytes": extra, "largest_bytes": largest, "model_bytes_per_rank": model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    from megatron_a3po.spawn import run_in_ranks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("streaming", "gather_all"):
            for r in run_in_ranks(_rank, 2, (args.vocab, args.hidden, args.layers, variant, tmp), timeout=900):
                rows.append({"variant": variant, **r})
    print(f"model: qwen2 vocab {args.vocab} hidden {args.hidden} layers {args.layers}, fp32, TP=2; "
          f"largest HF tensor {rows[0]['largest_bytes'] / 2**20:.1f} MiB, "
          f"model {rows[0]['model_bytes_per_rank'] / 2**20:.1f} MiB per rank")
    print(f"{'variant':<12} {'rank':>4} {'extra peak MiB':>15} {'x largest tensor':>17}")
    for r in rows:
        print(f"{r['variant']:<12} {r['rank']:>4} {r['extra_bytes'] / 2**20:>15.1f} "
              f"{r['extra_bytes'] / r['largest_bytes']:>17.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
