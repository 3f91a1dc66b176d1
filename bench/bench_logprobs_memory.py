"""Peak extra memory of log-prob + entropy (forward + backward) vs a naive full-softmax version.

Each variant runs in a fresh subprocess: the logits are allocated first, the kernel's peak-RSS counter is
reset (/proc/self/clear_refs), then forward + backward run and the peak resident memory above the
baseline is reported as a multiple of the logits' size. Both variants run side by side in one invocation.
The logits' gradient (1.0x, unavoidable for any implementation) is part of the "extra".

    python bench/bench_logprobs_memory.py                       # 4096 tokens x 32768 vocab, fp32 and bf16
    python bench/bench_logprobs_memory.py --tokens 2048 --vocab 65536
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, tokens: int, vocab: int, dtype_name: str, entropy: bool) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from megatron_a3po.logprobs import vocab_parallel_logprobs

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    logits = (torch.randn(tokens, vocab) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    w1, w2 = torch.randn(tokens), torch.randn(tokens)
    logits_bytes = logits.numel() * logits.element_size()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        peak_field = "VmHWM"
    except OSError:
        peak_field = None
    base_kib = _status_kib("VmRSS")
    if variant == "chunked":
        out = vocab_parallel_logprobs(logits, targets, compute_entropy=entropy, entropy_grad=entropy)
        loss = (out.logprobs * w1).sum() + ((out.entropy * w2).sum() if entropy else 0.0)
    else:
        ls = torch.log_softmax(logits.float(), dim=-1)
        lp = ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = (lp * w1).sum()
        if entropy:
            loss = loss + (-(ls.exp() * ls).sum(-1) * w2).sum()
    loss.backward()
    peak_kib = _status_kib(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_bytes": (peak_kib - base_kib) * 1024, "logits_bytes": logits_bytes,
                      "exact_peak": peak_field is not None}))


def measure(variant, tokens, vocab, dtype, entropy):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(vocab), "--dtype", dtype]
    if entropy:
        cmd.append("--entropy")
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: both)")
    ap.add_argument("--entropy", action="store_true")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.vocab, args.dtype, args.entropy)
        return
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    print(f"{args.tokens} tokens x {args.vocab} vocab; forward + backward; extra peak RSS / logits bytes")
    for dtype in dtypes:
        for entropy in (True, False):
            what = "log-prob + entropy (with entropy grad)" if entropy else "log-prob only"
            ours = measure("chunked", args.tokens, args.vocab, dtype, entropy)
            naive = measure("naive", args.tokens, args.vocab, dtype, entropy)
            size = ours["logits_bytes"]
            r_ours, r_naive = ours["extra_bytes"] / size, naive["extra_bytes"] / size
            print(f"  {dtype:8s} {what:40s} logits {size / 2**20:6.0f} MiB | chunked {r_ours:5.2f}x | "
                  f"naive full-softmax {r_naive:5.2f}x | naive/chunked {r_naive / max(r_ours, 1e-9):4.1f}x"
                  + ("" if ours["exact_peak"] else "  (ru_maxrss: approximate)"))


if __name__ == "__main__":
    main()
