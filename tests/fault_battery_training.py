"""Training fault battery (`make faults`; minutes per kill point on 2 CPU cores, so not part of `make test`).

An uninterrupted reference run (tiny config, 2 ranks, 3 RL steps, a checkpoint every step), then N runs of the same
job SIGKILLed (every rank and torchrun) at random moments: during rollouts, updates and saves. Each is resumed from
its --save directory (started again from scratch when no checkpoint was complete yet) and must end identical to
the reference: every metrics row (timings aside) and the final checkpoint's weights and Adam state bitwise; every
checkpoint directory left behind is complete or recognisably incomplete (never a marker with files missing).

    .venv/bin/python tests/fault_battery_training.py [N=10] [SEED=0]
"""

from __future__ import annotations

import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megatron_a3po import checkpoint_files  # noqa: E402
from helpers import TINY_RUN, rows, same, signal_job, start_job, stored_tensors, wait  # noqa: E402

JOB = [*TINY_RUN, "--tiny-model", "qwen2", "--train-steps", "3", "--save-interval", "1",
       "--reward", "layout_reward:first_char_parity"]
ENV = {"A3PO_PROGRESS": "0", "PYTHONPATH": str(Path(__file__).resolve().parent)}


def run(out: Path, ckpt: Path, log: Path, extra: list[str] = (), kill_after: float | None = None,
        events: dict | None = None) -> int | None:
    """Run the job to its end, or SIGKILL everything after `kill_after` s. `events` records when each
    checkpoint's temp dir and final dir first appeared (seconds from the start)."""
    proc = start_job([*extra, "--output-dir", str(out), "--save", str(ckpt)], log, ENV, JOB)
    if kill_after is None:
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < 900:
            if events is not None and ckpt.is_dir():
                for path in ckpt.glob("*step_*"):
                    events.setdefault(path.name, time.monotonic() - start)
            time.sleep(0.05)
        return wait(proc, log, timeout=1)
    deadline = time.monotonic() + kill_after
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    finished = proc.poll()
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the ranks, reparented, are gone too
    return finished


def compare(ref: Path, got: Path, tmp: Path) -> list[str]:
    problems = []
    want, have = ([r for r in rows(d / "out") if "train/lr" in r] for d in (ref, got))  # the training steps
    if [r["step"] for r in want] != [r["step"] for r in have]:
        problems.append(f"metrics steps {[r['step'] for r in have]} != {[r['step'] for r in want]}")
    for a, b in zip(want, have):
        diffs = [k for k in a if not k.startswith(("time/", "sync/")) and not same(a[k], b.get(k))]
        if diffs:
            problems.append(f"step {a['step']}: {diffs[:5]} differ")
    for part in ("", "optimizer"):
        x = stored_tensors(ref / "ckpt" / "step_000003" / part, tmp)
        y = stored_tensors(got / "ckpt" / "step_000003" / part, tmp)
        bad = [k for k, v in x.items() if isinstance(v, torch.Tensor) and not torch.equal(v, y.get(k))]
        if bad:
            problems.append(f"step_000003/{part or 'model'}: {len(bad)} tensors differ, e.g. {bad[0]}")
    return problems


def main(points: int = 10, seed: int = 0) -> int:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="a3po-faults-"))
    events: dict[str, float] = {}
    assert run(root / "ref" / "out", root / "ref" / "ckpt", root / "ref.log", events=events) == 0, \
        (root / "ref.log").read_text()[-3000:]
    # kill anywhere from just before the first save to just after the last: step 1's save, steps 2 and 3 (rollouts,
    # updates) and their saves
    window = (events[".tmp_step_000001"] - 2.0, events["step_000003"] + 0.5)
    print(f"reference run: checkpoints at {sorted(events.items(), key=lambda e: e[1])}; kill window {window}",
          flush=True)
    lost = 0
    for k in range(points):
        case = root / f"kill{k}"
        delay = rng.uniform(*window)
        run(case / "out", case / "ckpt", root / f"kill{k}.log", kill_after=delay)
        leftovers = [p for p in (case / "ckpt").glob("*step_*") if (p / checkpoint_files.MARKER).exists()
                     and checkpoint_files.problems(p)]
        resumable, _ = checkpoint_files.find_resumable(case / "ckpt") if (case / "ckpt").is_dir() else (None, [])
        if resumable is None:  # killed before its first complete checkpoint: the user starts again
            shutil.rmtree(case)
            rc = run(case / "out", case / "ckpt", root / f"resume{k}.log")
        elif resumable.name == "step_000003":  # killed after its last checkpoint: nothing left to train
            rc = 0
        else:
            rc = run(case / "out", case / "ckpt", root / f"resume{k}.log", extra=["--load", str(case / "ckpt")])
        problems = [f"resume exited {rc}"] if rc != 0 else compare(root / "ref", case, root)
        problems += [f"{p.name}: marker present but incomplete" for p in leftovers]
        lost += bool(problems)
        print(f"kill {k}: at {delay:.1f} s, resumed from {resumable.name if resumable else 'scratch'}: "
              f"{'OK' if not problems else problems}", flush=True)
    print(f"{points} kill points, {lost} runs not identical to the reference (files in {root})", flush=True)
    if not lost:
        shutil.rmtree(root)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
