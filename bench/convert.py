"""Conversion speed and memory on a ~1B-parameter Qwen2-shaped random model (bf16, generated here).

Prints, side by side:
- time ratio: each conversion direction's time (median, and best run / best run) / the time to read + write the same bytes with the
  `safetensors` package alone (load_file + save_file of every shard); target <= 2. Interpreter start-up and
  library imports are excluded from both (each runs in a fresh process that imports first, then times), and
  every timed run starts after `os.sync()` and ends when its bytes are on disk (`os.sync()`): on a shared VM,
  page-cache write-back otherwise makes single runs vary 5x depending on what was written just before.
- memory ratio: the conversion process's peak RSS above its post-import baseline, divided by the largest
  layer (transformer layer and, separately, the largest single tensor, the embedding). Peak RSS is the
  kernel's high-water mark (VmHWM), reset after imports via /proc/self/clear_refs.
The round trip is also checked bitwise. Disk: ~4 x the model size under --workdir (removed afterwards).

    python bench/convert.py                       # 18 layers, hidden 1536, vocab 151936: ~1.08B params, 2.2 GB
    python bench/convert.py --layers 4 --keep     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
             vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _vm_kib("VmRSS")


def write_random_qwen2(out: pathlib.Path, layers: int, shard_bytes: int = 1 << 30) -> dict:
    """An HF-format checkpoint written with the safetensors package, shard by shard (bounded memory)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    h, f, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(SHAPE["vocab_size"], h)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield from [(p + "input_layernorm.weight", 1 + rand(h)), (p + "post_attention_layernorm.weight", 1 + rand(h)),
                        (p + "self_attn.q_proj.weight", rand(q, h)), (p + "self_attn.q_proj.bias", rand(q)),
                        (p + "self_attn.k_proj.weight", rand(kv, h)), (p + "self_attn.k_proj.bias", rand(kv)),
                        (p + "self_attn.v_proj.weight", rand(kv, h)), (p + "self_attn.v_proj.bias", rand(kv)),
                        (p + "self_attn.o_proj.weight", rand(h, q)), (p + "mlp.gate_proj.weight", rand(f, h)),
                        (p + "mlp.up_proj.weight", rand(f, h)), (p + "mlp.down_proj.weight", rand(h, f))]
        yield "model.norm.weight", 1 + rand(h)

    shards, current, size, total, params = [], {}, 0, 0, 0
    for name, t in tensors():
        current[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        params += t.numel()
        if size >= shard_bytes:
            shards.append(current)
            save_file(current, out / f"part{len(shards)}.tmp", metadata={"format": "pt"})
            current, size = {}, 0
    if current:
        shards.append(current)
        save_file(current, out / f"part{len(shards)}.tmp", metadata={"format": "pt"})
    weight_map = {}
    for k, part in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part{k + 1}.tmp").rename(out / name)
        weight_map.update({n: name for n in part})
        part.clear()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = dict(SHAPE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=layers,
                  hidden_act="silu", dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    layer_bytes = 2 * (2 * h + q * h + q + 2 * (kv * h + kv) + h * q + 3 * f * h)
    return {"params": params, "bytes": total, "layer_bytes": layer_bytes, "embed_bytes": SHAPE["vocab_size"] * h * 2}


def child(kind: str, argv: list[str]) -> None:
    """Runs in a fresh process: import everything, reset the peak, time the work, print JSON."""
    sys.path.insert(0, str(ROOT))
    import safetensors.torch  # noqa: F401

    import checkpoints_tools.convert as convert
    import megatron.core.models.gpt  # noqa: F401  (imports excluded from the timing)

    os.sync()  # start from clean page cache write-back, so earlier runs' dirty pages do not slow this one
    base = _reset_peak()
    start = time.perf_counter()
    if kind == "safetensors":
        from safetensors.torch import load_file, save_file

        src, dst = pathlib.Path(argv[0]), pathlib.Path(argv[1])
        dst.mkdir()
        for f in sorted(src.glob("*.safetensors")):
            save_file(load_file(f), dst / f.name, metadata={"format": "pt"})
    else:
        rc = convert.main([kind, *argv, "--no-progress"])
        assert rc == 0, rc
    os.sync()  # timed until the bytes are on disk, for every variant alike
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "base_kib": base, "peak_kib": _vm_kib("VmHWM")}))


def _run_child(kind: str, *argv: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Bitwise equality of every tensor, read with the safetensors package (independent of the converter)."""
    import torch
    from safetensors import safe_open

    def handles(d):
        return {k: h for h in (safe_open(str(f), framework="pt") for f in sorted(d.glob("*.safetensors")))
                for k in h.keys()}

    left, right = handles(a), handles(b)
    if left.keys() != right.keys():
        return False
    for k in left:
        x, y = left[k].get_tensor(k), right[k].get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (median reported)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])
    work = pathlib.Path(tempfile.mkdtemp(prefix="a3po-bench-convert-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        info = write_random_qwen2(work / "hf", args.layers)
        print(f"model: Qwen2-shaped, {args.layers} layers, {info['params'] / 1e9:.2f}B params, bf16, "
              f"{info['bytes'] / 1e9:.2f} GB (generated in {time.perf_counter() - t0:.0f}s)")
        runs = {"base": [], "h2m": [], "m2h": []}
        for rep in range(args.repeats):  # interleaved: disk write-back from one run slows the next alike
            for name in ("copy", "mg", "back"):
                shutil.rmtree(work / name, ignore_errors=True)
            runs["base"].append(_run_child("safetensors", str(work / "hf"), str(work / "copy")))
            runs["h2m"].append(_run_child("hf-to-megatron", "--hf-path", str(work / "hf"), "--output", str(work / "mg")))
            runs["m2h"].append(_run_child("megatron-to-hf", "--megatron-path", str(work / "mg"), "--output",
                                          str(work / "back")))
        base, h2m, m2h = (sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for r in runs.values())  # medians
        identical = _same(work / "hf", work / "back")
        print(f"median of {args.repeats} runs each; seconds per run: " + ", ".join(
            f"{k} {[round(x['seconds'], 1) for x in v]}" for k, v in runs.items()))
        gib = 2**30
        best = {k: min(x["seconds"] for x in v) for k, v in runs.items()}  # interference only adds time
        print(f"{'':26s}{'seconds':>9s}{'x safetensors':>15s}{'best-run x':>12s}{'peak RSS':>11s}{'extra':>9s}"
              f"{'extra/layer':>13s}{'extra/embed':>13s}")
        for key, label, r in (("base", "safetensors read+write", base), ("h2m", "hf-to-megatron", h2m),
                              ("m2h", "megatron-to-hf", m2h)):
            extra = (r["peak_kib"] - r["base_kib"]) * 1024
            print(f"{label:26s}{r['seconds']:9.1f}{r['seconds'] / base['seconds']:15.2f}"
                  f"{best[key] / best['base']:12.2f}"
                  f"{r['peak_kib'] * 1024 / gib:9.2f}GB{extra / gib:7.2f}GB"
                  f"{extra / info['layer_bytes']:13.1f}{extra / info['embed_bytes']:13.1f}")
        print(f"largest transformer layer {info['layer_bytes'] / 2**20:.0f} MiB, embedding {info['embed_bytes'] / 2**20:.0f}"
              f" MiB, model {info['bytes'] / 2**20:.0f} MiB; round trip bitwise identical: {identical}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
