"""`a3po plan --config FILE [--config OVERLAY] --nodes N --gpus-per-node G --gpu-memory 141GiB [train flags]`.

Prints the per-GPU memory table of megatron_a3po.planner, whether the job fits, and which single knob makes it
fit if it does not. Exit 0 when it fits, 1 when it does not, 2 on a usage error. Any training flag (e.g.
--micro-batch-size 4) overrides the config, exactly as for megatron_a3po.train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_a3po import config as C
from megatron_a3po import planner as P
from megatron_a3po.dtypes import precision_name
from megatron_a3po.errors import ConfigError, UserError
from megatron_a3po.errors import report as report_error
from megatron_a3po.flag_parser import FlagParser
from megatron_a3po.job import check_context_length, model_source

GiB = P.GiB


def _gib(x: float) -> str:
    return f"{x / GiB:7.1f}"


def report(name: str, cfg, arch, source: str, layout: P.Layout, plan: P.Plan) -> str:
    p, m, t, rl = cfg.parallel, cfg.model, cfg.training, cfg.rl
    L, n = plan.lines, plan.notes
    dp = int(n["dp"])
    precision = precision_name(m)
    opt = "fp32 master + Adam m,v" + (f", sharded /{dp * p.context_parallel_size}" if t.use_distributed_optimizer
                                         else ", not sharded")
    rows = [
        (f"weights ({precision}, {n['params_per_gpu']} of {n['params']} params)", L["weights"]),
        ("gradients (fp32 main grads)", L["gradients"]),
        (f"optimizer ({opt})", L["optimizer"]),
        *([(f"reference policy (--kl-coef; {precision} weights)", L["reference"])] if "reference" in L else []),
        (f"activations (recompute {m.recompute_granularity or 'none'}, micro-batch {t.micro_batch_size}, "
         f"seq {n['seq']}{', flash attn' if m.transformer_impl != 'local' else ''})", L["activations"]),
        ("logits fp32 + log-prob/entropy chunks", L["logits"]),
        (f"vLLM budget ({rl.gpu_memory_utilization:.2f} x {layout.gpu_memory / GiB:.0f} GiB, rollout TP "
         f"{rl.rollout_tensor_parallel_size})", L["vllm"]),
        ("  of which vLLM weights", L["vllm_weights"]),
        (f"  of which KV cache ({plan.kv_tokens / 1e3:.0f}k tokens = "
         f"{plan.kv_tokens / plan.max_model_len:.0f} x {plan.max_model_len}-token sequences)", L["vllm_kv_cache"]),
        ("refit gather buffer (2 x largest tensor)", L["refit"]),
        ("reserve (CUDA context, NCCL, fragmentation)", L["reserve"]),
    ]
    offload = "offloaded" in L
    rollout_label = ("peak, rollout (weights + vLLM + refit + reserve; grads + optimizer on the host)" if offload
                     else "peak, rollout (model state + vLLM + refit + reserve)")
    peaks = [("peak, training (model state + activations + logits + reserve)", plan.train_peak),
             (rollout_label, plan.rollout_peak),
             ("peak, checkpoint save (model state + reserve; vLLM asleep, no device buffer)", plan.save_peak)]
    writers, g = int(n["writers_per_node"]), layout.gpus_per_node
    save_split = f"{writers} writing rank(s) x {L['save_host_writer'] / GiB:.1f}" + (
        f" + {g - writers} x {L['save_host_other'] / GiB:.1f}" if g > writers else "")
    host_rows = [
        ("  rollout (" + (f"{g} x {L['offloaded'] / GiB:.1f} GiB grads + optimizer offloaded)" if offload
                          else "nothing offloaded: --offload-train-during-rollout is off)"), plan.host["rollout"]),
        ("  training (vLLM asleep at level 2: no host copy of its weights)", plan.host["train"]),
        (f"  checkpoint save ({save_split} GiB)", plan.host["save"]),
    ]
    host_title = "host memory per node (busiest node; process baselines not counted)"
    width = max(len(label) for label, _ in rows + peaks + host_rows + [(host_title, 0)]) + 2
    out = [f"{name}: {layout.nodes} node(s) x {layout.gpus_per_node} GPUs, {layout.gpu_memory / GiB:.0f} GiB each",
           f"model: {arch.family}, {n['params']} params ({source}); TP {p.tensor_model_parallel_size} PP "
           f"{p.pipeline_model_parallel_size} CP {p.context_parallel_size} DP {dp}, sequence parallel "
           f"{'on' if p.sequence_parallel else 'off'}, distributed optimizer "
           f"{'on' if t.use_distributed_optimizer else 'off'}",
           f"{'per GPU':<{width}}    GiB"]
    out += [f"{label:<{width}}{_gib(value)}" for label, value in rows + peaks]
    out += [f"{host_title:<{width}}    GiB"] + [f"{label:<{width}}{_gib(value)}" for label, value in host_rows]
    state = plan.model_state
    out += [f"model state {state / GiB:.1f} GiB; largest gpu_memory_utilization that fits: {plan.max_utilization:.2f} "
            f"(KV cache {plan.max_kv_tokens / 1e3:.0f}k tokens" + (", grads + optimizer offloaded)" if offload else ")")]
    if plan.fits:
        headroom = plan.limit - max(plan.train_peak, plan.rollout_peak)
        out.append(f"FITS: {headroom / GiB:.1f} GiB headroom per GPU")
    else:
        out += [f"DOES NOT FIT: {problem}" for problem in plan.problems]
    return "\n".join(out)


def advice(cfg, arch, layout: P.Layout) -> list[str]:
    lines = []
    for flag, alt in P.suggestions(cfg, arch, layout, layout.gpus_per_node):
        verdict = "fits" if alt.fits else "still does not fit"
        lines.append(f"  try {flag}: training {alt.train_peak / GiB:.1f} GiB, rollout {alt.rollout_peak / GiB:.1f} "
                     f"GiB, KV {alt.kv_tokens / 1e3:.0f}k tokens -> {verdict}")
    if not any("-> fits" in line for line in lines):
        lines.append("  no single knob suffices: combine the ones above, add nodes/GPUs, or pick a smaller model")
    return lines


def markdown_row(name: str, cfg, layout: P.Layout, plan: P.Plan) -> str:
    p, L = cfg.parallel, plan.lines
    state = plan.model_state
    layout_text = (f"TP{p.tensor_model_parallel_size} PP{p.pipeline_model_parallel_size} DP{plan.notes['dp']}, "
                   f"rollout TP{cfg.rl.rollout_tensor_parallel_size}")
    cells = [name, plan.notes["params"], layout_text, f"{state / GiB:.1f}",
             f"{(L['activations'] + L['logits']) / GiB:.1f}", f"{L['vllm'] / GiB:.1f}",
             f"{L['vllm_kv_cache'] / GiB:.1f} ({plan.kv_tokens / plan.max_model_len:.0f} seq)",
             f"{plan.train_peak / GiB:.1f}", f"{plan.rollout_peak / GiB:.1f}", f"{plan.save_peak / GiB:.1f}",
             " / ".join(f"{plan.host[phase] / GiB:.0f}" for phase in ("rollout", "train", "save")),
             "yes" if plan.fits else "**no**"]
    return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = ("| config | params | layout | model state | activations + logits | vLLM budget | KV cache | "
                   "training peak | rollout peak | save peak | host per node: rollout / train / save | fits |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="a3po plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", default="141GiB", help="memory of one GPU, e.g. 141GiB (H200), 80GiB")
    parser.add_argument("--reserve", default="6GiB", help="per GPU, for the CUDA context, NCCL and fragmentation")
    parser.add_argument("--host-memory", default=None,
                        help="host memory of one node, e.g. 2TiB: each phase's host memory is checked against it")
    parser.add_argument("--markdown", action="store_true", help="print one markdown table row (with header)")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if known.nodes < 1 or known.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        layout = P.Layout(known.nodes, known.gpus_per_node, P.parse_memory(known.gpu_memory),
                          P.parse_memory(known.reserve), P.parse_memory(known.host_memory or "0"))
        cfg, args = C.parse_args(rest)
        if not args.config:
            raise C.ConfigError("give --config FILE (a paper setup, e.g. configs/qwen3-8b-base_a3po.yaml)")
        model = model_source(cfg, known_archs=True)  # the table of paper models: plan without the files
        arch, source = model.arch, model.origin
        check_context_length(cfg, model)  # the same refusal as --dry-run: vLLM would not start
        C.validate_against_arch(cfg, arch)  # TP must divide heads / query groups, PP the layers
        result = P.plan(cfg, arch, layout)
    except UserError as err:
        return report_error(err)
    name = " + ".join(Path(c).stem for c in args.config)
    if known.markdown:
        print(MARKDOWN_HEADER)
        print(markdown_row(name, cfg, layout, result))
    else:
        print(report(name, cfg, arch, source, layout, result))
        if not result.fits:
            print("to make it fit, change one of:")
            print("\n".join(advice(cfg, arch, layout)))
    return 0 if result.fits else 1
