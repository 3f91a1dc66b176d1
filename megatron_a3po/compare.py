"""`a3po compare`: the paper's polarity study as one command.

    a3po compare [--study polarity|token-grid|pn-ratio] [--algorithms psr,nsr,dapo,a3po] [--baseline dapo] \
        --seeds 1,2,3 --train-steps 30 --output runs/compare \
        [--load CKPT | --hf-path DIR] [--config FILE ...] [--nproc-per-node N] [training flags ...]

`--study` picks the algorithms, the baseline of the paired differences and the claims checked (compare_studies);
`--algorithms` runs another selection (presets, the study's overlays, or overlay YAML files).

Every (algorithm, seed) is a real training job (`torchrun -m megatron_a3po.train`) from the same warm start, with
the same flags except the algorithm (a preset name, or a config overlay YAML) and `--seed`; the seed fixes the
data order and the rollout seeds, so the runs of one seed see the same prompts whatever the algorithm. Warm start:
`--load` (an `a3po-convert` output), `--hf-path`, else the embedded one, built once as in `make demo` (tiny model
-> SFT -> a3po-convert) under OUTPUT/warm_start and reused. Runs go to OUTPUT/runs/<name>_s<seed>/ (train.log,
metrics.jsonl, final.txt, ckpt/), one after another (`--jobs J`: J at a time). Resumable: a run with final.txt is
skipped; a run that died part-way resumes from its last checkpoint (ckpt/, every `--save-interval` steps), or
starts over when it has none. Then compare_report writes OUTPUT/compare.png, compare_token_probs.png, compare.md
and compare.json.
Flags not listed here go to every training job unchanged. Bad input: exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_a3po.compare_studies import DEFAULT_STUDY, STUDIES
from megatron_a3po.errors import ConfigError, UserError, report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
# Set per run by compare itself: passing them through would break "everything else identical".
OWN_FLAGS = ("--algorithm", "--seed", "--train-steps", "--output-dir", "--save", "--export-hf", "--save-interval",
             "--keep-last-checkpoints")
SFT_SEED = 1234  # the embedded warm start's seed (as make demo): one warm start for every run and seed
SFT_BATCH = 64  # the embedded warm start's global batch (as make demo)


# The default study's task: level 6 (two-digit addition answered directly, 3-4 tokens, or after a worked column
# scratchpad, 15-20 tokens), so response length is the policy's choice and can move. Its embedded warm start
# (300 SFT steps on a 50/50 mix of both forms) works most sums out correctly and rarely answers directly right, so
# every algorithm has a signal from step 1. Level 1 (make demo's task, 60 SFT steps) stays available via --level 1.
DEFAULT_LEVEL = 6
SFT_STEPS, SFT_STEPS_OTHER_LEVELS = {6: 300}, 60  # embedded warm start SFT steps per level (60: as make demo)


def study_flags(level: int) -> list[str]:
    """The default study's training flags on top of configs/tiny_cpu.yaml (sized for `make compare` on 2 CPU
    cores): 16 prompts x 8 responses per step in 2 optimizer steps (the second one can clip), validation every 5
    steps on 64 prompts x 8 samples."""
    flags = ["--rollout-batch-size", "16", "--ppo-mini-batch-size", "8", "--eval-interval", "5",
             "--eval-prompts", "64", "--eval-n", "8"]
    if level == 6:  # "47+38=" and a worked answer "7+8=15,4+3+1=8;85" (at most 19 characters + end token)
        flags += ["--max-prompt-length", "16", "--max-response-length", "24"]
    return flags


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="a3po compare", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                epilog="Other flags go to every training job (megatron_a3po.train) unchanged.")
    p.add_argument("--study", default=DEFAULT_STUDY, choices=sorted(STUDIES),
                   help=f"which study: its algorithms, baseline and claims (default {DEFAULT_STUDY})")
    p.add_argument("--algorithms", default=None,
                   help="comma-separated presets (rl_config.PRESETS), the study's overlay names or config overlay "
                        "YAML files (default: the study's)")
    p.add_argument("--baseline", default=None,
                   help="the algorithm every other is compared with, seed by seed (default: the study's)")
    p.add_argument("--seeds", default="1,2", help="comma-separated integer seeds (default 1,2)")
    p.add_argument("--train-steps", type=int, default=20, help="RL steps per run (default 20)")
    p.add_argument("--output", default="runs/compare", help="study directory (default runs/compare)")
    warm = p.add_mutually_exclusive_group()
    warm.add_argument("--load", help="warm start: a converted Megatron checkpoint (a3po-convert hf-to-megatron)")
    warm.add_argument("--hf-path", help="warm start: an HF model directory")
    p.add_argument("--config", action="append", default=[],
                   help="training YAML, repeatable (default: configs/tiny_cpu.yaml plus the default study's sizes)")
    p.add_argument("--level", type=int, default=None,
                   help="synthetic arithmetic level of the embedded warm start's SFT and of the training data "
                        f"(default {DEFAULT_LEVEL}; the data flag is added only without --config or with --level)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help=f"embedded warm start SFT steps (default {SFT_STEPS[DEFAULT_LEVEL]} on level {DEFAULT_LEVEL}, "
                        f"{SFT_STEPS_OTHER_LEVELS} on the others)")
    p.add_argument("--nproc-per-node", type=int, default=2, help="ranks per training job (default 2)")
    p.add_argument("--jobs", type=int, default=1, help="training jobs at a time (default 1: sequential)")
    p.add_argument("--save-interval", type=int, default=10, help="checkpoint every N steps, for resuming (default "
                                                                  "10; the last step is always saved)")
    args, extra = p.parse_known_args(argv)
    for flag in extra:
        if flag.split("=", 1)[0] in OWN_FLAGS:
            raise ConfigError(f"{flag.split('=', 1)[0]} is set by a3po compare per run; use --algorithms / --seeds "
                             "/ --train-steps / --output / --save-interval instead")
    return args, extra


def parse_items(text: str, overlays: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """{run name: the flags that select it}: a preset -> --algorithm NAME; one of the study's `overlays` or a YAML
    -> --config PATH (named by its file stem)."""
    from megatron_a3po.rl_config import PRESETS

    overlays = overlays or {}
    items: dict[str, list[str]] = {}
    for item in [s.strip() for s in text.split(",")]:
        if item in overlays:
            name, flags = item, ["--config", str(overlays[item])]
        elif item in PRESETS:
            name, flags = item, ["--algorithm", item]
        elif item.endswith((".yaml", ".yml")):
            if not Path(item).is_file():
                raise ConfigError(f"--algorithms: config overlay {item} does not exist")
            name, flags = Path(item).stem, ["--config", str(Path(item).resolve())]
        else:
            raise ConfigError(f"--algorithms: unknown algorithm {item!r}; use presets ({', '.join(PRESETS)}), the "
                              f"study's overlays ({', '.join(overlays) or 'none'}) or config overlay .yaml files")
        if name in items:
            raise ConfigError(f"--algorithms: {name!r} given twice")
        items[name] = flags
    return items


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct integers >= 0")
    return seeds


class Study:
    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args, self.out = args, Path(args.output).resolve()
        self.spec = STUDIES[args.study]
        self.items = parse_items(args.algorithms or ",".join(self.spec.algorithms), self.write_overlays())
        self.seeds = parse_seeds(args.seeds)
        self.baseline = args.baseline or self.spec.baseline
        if self.baseline not in self.items:
            raise ConfigError(f"--baseline {self.baseline}: not among the algorithms run ({', '.join(self.items)}); "
                              "name one of them")
        for flag, value in (("--train-steps", args.train_steps), ("--nproc-per-node", args.nproc_per_node),
                            ("--jobs", args.jobs), ("--save-interval", args.save_interval)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        for flag, path in [("--load", args.load), ("--hf-path", args.hf_path), *(("--config", c) for c in args.config)]:
            if path and not Path(path).exists():
                raise ConfigError(f"{flag} {path}: no such file or directory")
        self.level = args.level if args.level is not None else DEFAULT_LEVEL
        from megatron_a3po.rewards.synthetic import LEVELS

        if self.level not in LEVELS:
            raise ConfigError(f"--level {self.level}: unknown; the synthetic arithmetic levels are {sorted(LEVELS)}")
        self.sft_steps = (args.sft_steps if args.sft_steps is not None
                          else SFT_STEPS.get(self.level, SFT_STEPS_OTHER_LEVELS))
        if self.sft_steps < 1:
            raise ConfigError(f"--sft-steps must be >= 1, got {self.sft_steps}")
        configs = [str(Path(c).resolve()) for c in args.config] or [str(DEFAULT_CONFIG)]
        self.common = [f for c in configs for f in ("--config", c)]
        if not args.config:
            self.common += study_flags(self.level)
        if (args.level is not None or not args.config) and "--dataset" not in extra:
            self.common += ["--dataset", f"synthetic:arithmetic:{self.level}"]
        self.common += extra
        self.print_lock = threading.Lock()

    def write_overlays(self) -> dict[str, Path]:
        """The study's config overlays as OUTPUT/overlays/<name>.yaml (rewritten each time: they are the study's)."""
        folder = self.out / "overlays"
        paths = {}
        for name, text in self.spec.overlays.items():
            folder.mkdir(parents=True, exist_ok=True)
            paths[name] = folder / f"{name}.yaml"
            if not paths[name].is_file() or paths[name].read_text() != text:
                paths[name].write_text(text)
        return paths

    def say(self, text: str) -> None:
        with self.print_lock:
            print(text, flush=True)

    # ---- the warm start ---------------------------------------------------------------------------------------

    def warm_start(self) -> list[str]:
        if self.args.load:
            return ["--load", str(Path(self.args.load).resolve())]
        if self.args.hf_path:
            return ["--hf-path", str(Path(self.args.hf_path).resolve())]
        ws = self.out / "warm_start"
        tp = 2 if self.args.nproc_per_node % 2 == 0 else 1
        # SFT data-parallel over the ranks (TP=1): on CPU ranks, ~20% faster per step than TP=2, and the same loss;
        # then a3po-convert shards the result for the runs' TP.
        sft_ranks = self.args.nproc_per_node if SFT_BATCH % self.args.nproc_per_node == 0 else 1
        recipe = {"level": self.level, "sft_steps": self.sft_steps, "seed": SFT_SEED, "sft_ranks": sft_ranks, "tp": tp}
        marker = ws / "warm_start.json"
        if marker.is_file():
            made = json.loads(marker.read_text())
            if made != recipe:
                raise ConfigError(f"{ws} was built with {made}, this study asks for {recipe}; use another --output")
            self.say(f"warm start: reusing {ws / 'sft_megatron'} ({made})")
            return ["--load", str((ws / "sft_megatron").resolve())]
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        py, log = sys.executable, ws / "warm_start.log"
        steps = [
            ("tiny random HF model", [py, "-m", "megatron_a3po.models.tiny", "--out", ws / "base", "--family",
                                      "qwen2", "--seed", "0"]),
            (f"SFT on level {self.level}, {self.sft_steps} steps", self.torchrun("megatron_a3po.sft", sft_ranks) + [
                "--hf-path", ws / "base", "--sft-output", ws / "sft_hf", "--sft-steps", self.sft_steps, "--sft-level",
                self.level, "--tensor-model-parallel-size", 1, "--make-vocab-size-divisible-by", 64,
                "--global-batch-size", SFT_BATCH, "--micro-batch-size", min(32, SFT_BATCH // sft_ranks), "--lr",
                "1e-3", "--min-lr", "1e-4", "--train-iters", self.sft_steps, "--seed", SFT_SEED]),
            ("a3po-convert hf-to-megatron", [py, "-m", "checkpoints_tools.convert", "hf-to-megatron", "--hf-path",
                                             ws / "sft_hf", "--output", ws / "sft_megatron",
                                             "--tensor-model-parallel-size", tp, "--no-progress"]),
        ]
        for title, cmd in steps:
            self.say(f"warm start: {title}")
            start = time.time()
            rc = self.execute([str(c) for c in cmd], log, prefix="warm start")
            if rc != 0:
                raise RuntimeError(f"warm start step '{title}' failed (exit {rc}); see {log}")
            self.say(f"warm start: {title} took {time.time() - start:.0f}s")
        marker.write_text(json.dumps(recipe) + "\n")
        return ["--load", str((ws / "sft_megatron").resolve())]

    # ---- the runs ---------------------------------------------------------------------------------------------

    def torchrun(self, module: str, ranks: int | None = None) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ranks or self.args.nproc_per_node}", "-m", module]

    def execute(self, cmd: list[str], log: Path, prefix: str) -> int:
        """Run `cmd` with its output appended to `log`; step lines and errors echoed with `prefix`."""
        env = dict(os.environ, A3PO_PROGRESS="0", PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"),
                   VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                f.write(line)
                if line.startswith(("[step", "[sft]", "validation accuracy")) or "rror" in line:
                    self.say(f"  {prefix}: {line.rstrip()}")
            return proc.wait()

    def run_one(self, name: str, seed: int, warm: list[str], index: str) -> tuple[str, bool]:
        run = self.out / "runs" / f"{name}_s{seed}"
        base = [*self.common, *self.items[name], *warm, "--seed", str(seed), "--train-steps",
                str(self.args.train_steps)]
        recorded = run / "compare_command.json"
        same_flags = recorded.is_file() and json.loads(recorded.read_text()) == base
        if (run / "final.txt").is_file():
            if recorded.is_file() and not same_flags:
                self.say(f"warning: {run.name} was finished with other flags than this study's (see {recorded}); "
                         "kept as is: use another --output for a different study")
            self.say(f"skip {run.name}: finished")
            return run.name, True
        ckpt = run / "ckpt"
        resume = (ckpt / "latest").exists() and same_flags
        if resume:
            self.say(f"{index} {run.name}: resuming from {ckpt / (ckpt / 'latest').read_text().strip()} "
                     f"(log: {run / 'train.log'})")
        else:
            shutil.rmtree(run, ignore_errors=True)  # a partial run without a checkpoint starts over
            run.mkdir(parents=True)
            recorded.write_text(json.dumps(base) + "\n")
            self.say(f"{index} {run.name}: training (log: {run / 'train.log'})")
        cmd = self.torchrun("megatron_a3po.train") + base + [
            "--output-dir", str(run.resolve()), "--save", str(ckpt.resolve()),
            "--save-interval", str(self.args.save_interval), "--keep-last-checkpoints", "1"]
        if resume:
            cmd += ["--load", str(ckpt.resolve())]  # last --load wins: the run's own checkpoint
        start = time.time()
        rc = self.execute(cmd, run / "train.log", prefix=run.name)
        done = rc == 0 and (run / "final.txt").is_file()
        final = (run / "final.txt").read_text().strip() if done else f"FAILED (exit {rc}); see {run / 'train.log'}"
        self.say(f"{index} {run.name}: {time.time() - start:.0f}s, {final}")
        return run.name, done

    def run_all(self) -> list[str]:
        """Every run (seed-major: each seed's algorithms back to back); the names of the failed ones."""
        warm = self.warm_start()
        todo = [(name, seed) for seed in self.seeds for name in self.items]
        with ThreadPoolExecutor(self.args.jobs) as pool:
            results = list(pool.map(lambda ij: self.run_one(*ij[1], warm, f"[{ij[0] + 1}/{len(todo)}]"),
                                    enumerate(todo)))
        return [name for name, ok in results if not ok]


def _shown(path) -> str:
    """`path` relative to the working directory when it lies below it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, extra = parse_args(argv)
        study = Study(args, extra)
    except UserError as err:
        return report(err)
    from megatron_a3po import compare_report

    start = time.time()
    try:
        failed = study.run_all()
    except UserError as err:
        return report(err)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    settings = {"study": args.study, "baseline": study.baseline, "algorithms": list(study.items),
                "seeds": study.seeds, "train_steps": args.train_steps,
                "nproc_per_node": args.nproc_per_node, "level": study.level, "flags": study.common,
                "warm_start": _shown(args.load or args.hf_path or study.out / "warm_start" / "sft_megatron")}
    paths = compare_report.write_report(study.out, list(study.items), study.seeds, settings, study.spec.claims)
    print((study.out / "compare.md").read_text())
    print(f"compare took {time.time() - start:.0f}s; wrote {', '.join(_shown(p) for p in paths)}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (their train.log says why); rerun the same "
              "command to retry them, finished runs are skipped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
