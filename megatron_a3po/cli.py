"""Console scripts: `a3po plot RUN_DIR` and `a3po-train` (torchrun on one node around megatron_a3po.train)."""

from __future__ import annotations

import os
import sys

from megatron_a3po.flag_parser import FlagParser


def a3po(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # takes every training flag too: plan_cli parses its own arguments
        from megatron_a3po.plan_cli import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["eval"]:  # vLLM evaluation on local benchmark files (docs/evaluation.md)
        from megatron_a3po.evaluation.cli import run as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["compare"]:  # algorithms x seeds from one warm start, then compare.png/md/json
        from megatron_a3po.compare import main as compare_main

        return compare_main(argv[1:])
    parser = FlagParser(prog="a3po", description="megatron-a3po utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="per-GPU memory plan of a config on a GPU cluster (a3po plan --help)")
    sub.add_parser("eval", help="evaluate an HF checkpoint on benchmarks (a3po eval --help)")
    sub.add_parser("compare", help="algorithms x seeds from one warm start -> compare.png/md/json (a3po compare --help)")
    plot = sub.add_parser("plot", help="write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir")
    args = parser.parse_args(argv)
    from megatron_a3po.metrics import plot_run

    from megatron_a3po.errors import ConfigError, UserError, report

    try:
        if not os.path.isfile(os.path.join(args.run_dir, "metrics.jsonl")):
            raise ConfigError(f"{args.run_dir}/metrics.jsonl not found; pass the --output-dir of a training run")
        print(plot_run(args.run_dir))
    except UserError as err:
        return report(err)
    return 0


def a3po_train(argv: list[str] | None = None) -> int:
    """`a3po-train [--nproc-per-node N] TRAIN_FLAGS...` = torchrun --standalone on this node."""
    argv = sys.argv[1:] if argv is None else argv
    parser = FlagParser(prog="a3po-train", add_help=False)  # an abbreviation goes on to the trainer, which refuses it
    parser.add_argument("--nproc-per-node", type=int, default=None)
    known, rest = parser.parse_known_args(argv)
    nproc = known.nproc_per_node or (_gpu_count() or 2)
    # SIGTERM (preemption) lets every rank finish its step and checkpoint: give them more than torchrun's 30 s.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--shutdown-timeout={os.environ.get('SHUTDOWN_TIMEOUT', '900')}", "-m", "megatron_a3po.train", *rest]
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
