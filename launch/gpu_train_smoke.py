"""Training-only smoke for a GPU machine with torch + CUDA and nothing else (no vLLM, no Transformer Engine):
the real RL job (`megatron_a3po.train`: job resolution, rl_job, RLTrainer, checkpointer, run guards, metrics) on a
tiny model with only vLLM's engine replaced by a scripted one (per prompt one correct answer and wrong ones, random
rollout log-probs). What it proves on the GPU: bf16 + distributed optimizer, packed THD micro-batches on the local
layer spec (--max-tokens-per-gpu), the NaN guard (a NaN loss injected at step 1 skips that update), a save and an
exact resume (run B resumes run A's step-2 checkpoint; steps 3-4 must match A's), device-to-host syncs per step and
each phase's peak device memory next to `a3po plan`'s figure. A few minutes at most; exit 0 only if all rows pass.

  python launch/gpu_train_smoke.py [--out DIR]
  make gpu-wheels   (here) -> dist/gpu-wheels/*.whl: this package, megatron-core and the pure-Python packages the
                    job imports that a torch-only machine lacks; there: pip install --no-deps dist/gpu-wheels/*.whl
Without CUDA it runs the same job under A3PO_EMULATE_CUDA=1 (device and NCCL rules checked, host syncs counted):
tests/test_gpu_smoke.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT, NAN_STEP = 4, 2, 1
FLAGS = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2", "--tensor-model-parallel-size", "1",
         "--transformer-impl", "local", "--bf16", "--use-distributed-optimizer", "--max-tokens-per-gpu", "64",
         "--rollout-batch-size", "8", "--rollout-n", "4", "--ppo-mini-batch-size", "4", "--train-steps", str(STEPS),
         "--eval-interval", "0", "--eval-prompts", "4", "--eval-n", "2", "--save-interval", str(SAVE_AT)]
NOT_COMPARED = ("time/", "sync/", "memory/")  # differ between runs by nature
IMPORTS_ENV = "A3PO_SMOKE_IMPORTS"  # a file: run A's job writes the distributions it imported there


class ScriptedEngine:
    """RolloutEngine's interface (generate, refit, sleep, wake_up) without vLLM: for each "a+b=" prompt the correct
    sum first, then wrong two-digit answers, each ended by EOS; log-probs random, seeded by step. Refit streams
    every weight from Megatron through the HF mapping, as for vLLM, and drops it."""

    def __init__(self, hf_path: str, *, seed: int = 0, **_vllm_settings):
        from transformers import AutoTokenizer

        self.tokenizer, self.seed = AutoTokenizer.from_pretrained(hf_path), seed
        self.refitted_tensors = 0

    def generate(self, prompts, sampling, pad_id: int, step: int = 0, round: int = 0, score=None):
        import torch

        from megatron_a3po.rollout.scripted import arithmetic_batch

        # Draws fixed by (seed, step, round), as vLLM's per-request seeds are: a resumed run sees the same rollouts.
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * step + 7919 * round)
        return arithmetic_batch(self.tokenizer, prompts, sampling.n, generator, pad_id, score)

    def refit(self, weights) -> None:
        self.refitted_tensors = sum(1 for _ in weights)

    def sleep(self, keep_weights: bool = False) -> None:
        pass

    def wake_up(self) -> None:
        pass


def count_host_syncs_per_step() -> None:
    """On CUDA: count torch's synchronizing calls in each RL step (torch.cuda.set_sync_debug_mode warns on every
    one) into `sync/host_syncs`, the metric CUDA emulation fills on CPU."""
    import warnings

    import torch

    from megatron_a3po import trainer

    torch.cuda.set_sync_debug_mode("warn")
    warnings.filterwarnings("always", message=".*synchroniz.*")
    seen = [0]
    show = warnings.showwarning

    def counting(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            seen[0] += 1
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = counting
    step = trainer.RLTrainer.step

    def counted(self, number):
        before = seen[0]
        metrics = step(self, number)
        metrics["sync/host_syncs"] = float(seen[0] - before)
        return metrics

    trainer.RLTrainer.step = counted


def job(argv: list[str]) -> int:
    """One rank of the job (this process), vLLM's engine scripted."""
    import torch

    from megatron_a3po import train
    from megatron_a3po.rollout import engine

    engine.RolloutEngine = ScriptedEngine  # rl_job.run imports it from there at run time
    if torch.cuda.is_available():
        count_host_syncs_per_step()
    rc = train.main(argv)
    if os.environ.get(IMPORTS_ENV):  # which distributions the job imported: what `make gpu-wheels` must carry
        from importlib.metadata import packages_distributions

        owners = packages_distributions()
        dists = {d for name in list(sys.modules) for d in owners.get(name.partition(".")[0], [])}
        Path(os.environ[IMPORTS_ENV]).write_text("\n".join(sorted(dists)) + "\n")
    return rc


def run_job(out: Path, name: str, extra: list[str], env: dict) -> tuple[int, list[dict]]:
    # one rank: MASTER_PORT 0 lets its TCPStore bind a port the OS picks, at once (a port chosen here could be
    # taken by another process during the job's imports: EADDRINUSE in a clean-clone make test)
    env = {**env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    argv = [*FLAGS, "--output-dir", str(out / name), *extra]
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run([sys.executable, __file__, "--job", *argv], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    path = out / name / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return rc, [r for r in rows if "train/lr" in r]


def plan_figures(flags: list[str], gpus: int, gpu_memory: int, with_vllm: bool) -> dict[str, float]:
    """`a3po plan`'s per-GPU figures (GiB) for the job of `flags` on one node of `gpus` GPUs, reserve 0 (torch's
    allocator counters do not see the CUDA context or NCCL). Without vLLM (the training-only smoke) the rollout
    phase holds the model state and refit adds its gather buffer."""
    from megatron_a3po import config as C
    from megatron_a3po import planner as P
    from megatron_a3po.job import model_source

    cfg, _ = C.parse_args(flags)
    plan = P.plan(cfg, model_source(cfg, known_archs=True).arch, P.Layout(1, gpus, gpu_memory, 0))
    gib = 2.0**30
    rollout = plan.rollout_peak if with_vllm else plan.model_state
    refit = plan.rollout_peak if with_vllm else plan.model_state + plan.lines.get("refit", 0.0)
    return {"rollout": rollout / gib, "refit": refit / gib, "old_logprobs": plan.train_peak / gib,
            "train": plan.train_peak / gib}


def memory_rows(steps: list[dict], figures: dict[str, float]) -> list[str]:
    """Per phase: the largest measured peak over the steps (allocated / reserved), the plan's figure, the ratio."""
    lines = []
    for phase, planned in figures.items():
        allocated = max((r.get(f"memory/{phase}_peak_gib", 0.0) for r in steps), default=0.0)
        reserved = max((r.get(f"memory/{phase}_reserved_peak_gib", 0.0) for r in steps), default=0.0)
        ratio = f"{reserved / planned:.2f}" if planned else "-"
        lines.append(f"    {phase:<13} measured {allocated:8.3f} GiB allocated, {reserved:8.3f} GiB reserved;  "
                     f"plan {planned:8.3f} GiB;  reserved/plan {ratio}")
    return lines


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default="/tmp/a3po_gpu_train_smoke", help="scratch directory (emptied first)")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "A3PO_PROGRESS": "0", "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    if not on_gpu:
        env["A3PO_EMULATE_CUDA"] = "1"  # the GPU code path on CPU: device/NCCL rules, host syncs counted
    start = time.time()
    # A: steps 1-4, NaN loss at step 1 (the guard must skip that update), checkpoints at steps 2 and 4.
    rc_a, a = run_job(out, "a", ["--save", str(out / "ckpt_a")],
                      {**env, "A3PO_TEST_INJECT_NAN_STEP": str(NAN_STEP), IMPORTS_ENV: str(out / "imports.txt")})
    # B: resumes A's step-2 checkpoint and trains steps 3-4 again: the same numbers as A's.
    resume_dir = out / "ckpt_a" / f"step_{SAVE_AT:06d}"
    rc_b, b = run_job(out, "b", ["--load", str(resume_dir), "--save", str(out / "ckpt_b")], env)
    seconds = time.time() - start

    by_a, by_b = {r["step"]: r for r in a}, {r["step"]: r for r in b}
    good = [by_a[s] for s in range(NAN_STEP + 1, STEPS + 1) if s in by_a]
    diffs = sorted({k for s in by_b for k in by_b[s] if not k.startswith(NOT_COMPARED)
                    and not same(by_b[s][k], by_a.get(s, {}).get(k))})
    packed = [r.get("train/micro_batches", 0) for r in a]
    syncs = [r.get("sync/host_syncs") for r in a]
    checks = [
        ("both runs exit 0", rc_a == 0 and rc_b == 0, f"exit codes {rc_a}, {rc_b} (logs: {out}/a.log, b.log)"),
        (f"A logs steps 1-{STEPS}, B steps {SAVE_AT + 1}-{STEPS}",
         sorted(by_a) == list(range(1, STEPS + 1)) and sorted(by_b) == list(range(SAVE_AT + 1, STEPS + 1)),
         f"A {sorted(by_a)}, B {sorted(by_b)}"),
        (f"NaN guard: step {NAN_STEP}'s update skipped, later ones not",
         by_a.get(NAN_STEP, {}).get("train/skipped_updates", 0) > 0 and len(good) == STEPS - NAN_STEP
         and all(r.get("train/skipped_updates", 1) == 0 for r in good),
         str([r.get("train/skipped_updates") for r in a])),
        ("finite loss and grad norm after it", bool(good) and all(
            math.isfinite(r.get("train/grad_norm", math.nan)) and math.isfinite(r.get("loss/pg_loss", math.nan))
            for r in good), str([round(r.get("train/grad_norm", math.nan), 4) for r in good])),
        # Packs: within the 64-token budget each, and no row padding (padded rows would compute ~4x the tokens).
        ("packed THD micro-batches (--max-tokens-per-gpu 64)", bool(packed) and all(
            0 < r["train/real_tokens"] <= r["train/computed_tokens"] <= min(64 * r["train/micro_batches"],
                                                                             1.25 * r["train/real_tokens"])
            for r in a), f"micro-batches per step {packed}, computed/real tokens "
                         f"{[(int(r['train/computed_tokens']), int(r['train/real_tokens'])) for r in a]}"),
        (f"checkpoints at steps {SAVE_AT} and {STEPS}", resume_dir.is_dir() and (out / "ckpt_a" / "latest").is_file()
         and (out / "ckpt_a" / "latest").read_text().strip() == f"step_{STEPS:06d}", ""),
        (f"resume: B's steps {SAVE_AT + 1}-{STEPS} equal A's", bool(by_b) and not diffs,
         "bitwise" if by_b and not diffs else f"differ: {diffs[:6]}"),
        ("host syncs counted per step", bool(syncs) and all(s is not None for s in syncs), str(syncs)),
        ("under 10 minutes", seconds < 600, f"{seconds:.0f}s"),
    ]
    if on_gpu:
        steps = a + b
        measured = any(k.startswith("memory/") for r in steps for k in r)
        checks.append(("peak device memory per phase measured", measured, ""))
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU (A3PO_EMULATE_CUDA=1)"
    print(f"\nGPU training-only smoke on {device}: torch {torch.__version__}, no vLLM, local layer spec")
    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    if on_gpu:
        print("  peak device memory per phase vs `a3po plan` (reserve 0):")
        figures = plan_figures(FLAGS, 1, torch.cuda.get_device_properties(0).total_memory, with_vllm=False)
        print("\n".join(memory_rows(a + b, figures)))
    for name in ("a", "b"):
        log = (out / f"{name}.log").read_text(errors="replace")
        if "Traceback" in log or "error" in log.lower():
            print(f"\nlast lines of {out / (name + '.log')}:\n" + "\n".join(log.splitlines()[-20:]))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--job"]:
        sys.exit(job(sys.argv[2:]))
    sys.exit(main())
