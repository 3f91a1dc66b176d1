"""Step metrics (polarity-split), their reduction over ranks, JSONL / wandb logging, PNG plots.

Statistics that live on the last pipeline stage (entropy, advantages, clip fractions) are accumulated there as
typed statistics (Mean = sum and count, Sum, Max, Ratio of two counts), gathered from every rank and merged by
their type, so they are exact over DP ranks and micro-batches.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_a3po.algorithms import is_correct, kl_penalty
from megatron_a3po.errors import RunFilesError


class PhaseTimer:
    """Seconds per phase of a step. A phase timed inside another counts for itself only (exclusive times: the
    reward scoring inside the rollout call is `reward`, not `rollout`). With a `step`, an exception that escapes a
    phase leaves with a note naming the RL step and the innermost phase it failed in; its type, message and
    traceback stay as they were."""

    def __init__(self, step: int | None = None, memory: "CudaPeakMemory | None" = None):
        self.step = step
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds spent in phases nested inside it
        # Peak device memory per phase (CUDA only; inclusive of nested phases): launch/gpu_smoke.sh sets it
        # next to `a3po plan`'s figures.
        self.memory = memory if memory is not None else (CudaPeakMemory() if torch.cuda.is_available() else None)
        self.peaks: dict[str, tuple[int, int]] = {}  # phase -> (allocated, reserved) bytes
        self._open_peaks: list[tuple[int, int]] = []

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        if self.memory is not None:  # the enclosing phase keeps its peak so far; this one counts from here
            if self._open_peaks:
                self._open_peaks[-1] = _pairmax(self._open_peaks[-1], self.memory.read())
            self.memory.reset()
            self._open_peaks.append((0, 0))
        try:
            yield
        except Exception as err:
            if self.step is not None and not any(n.startswith("RL step ") for n in getattr(err, "__notes__", ())):
                err.add_note(f"RL step {self.step}, phase {name}")
            raise
        finally:
            elapsed = time.perf_counter() - start
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed
            if self.memory is not None:
                peak = _pairmax(self._open_peaks.pop(), self.memory.read())
                self.peaks[name] = _pairmax(self.peaks.get(name, (0, 0)), peak)
                if self._open_peaks:
                    self._open_peaks[-1] = _pairmax(self._open_peaks[-1], peak)

    def skipped(self, name: str) -> None:
        """A phase this step did not run: logged as 0 s."""
        self.seconds.setdefault(name, 0.0)

    def as_metrics(self) -> dict:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        for name, (allocated, reserved) in self.peaks.items():
            out[f"memory/{name}_peak_gib"] = allocated / 2**30  # tensors alive at the phase's peak
            out[f"memory/{name}_reserved_peak_gib"] = reserved / 2**30  # what torch's allocator held
        return out


class CudaPeakMemory:
    """Peak device memory of torch's caching allocator since the last reset: host-side counters, no device sync.
    Memory outside that allocator (CUDA context, NCCL buffers, cuBLAS workspaces) is not in it."""

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def read(self) -> tuple[int, int]:
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def _pairmax(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), max(a[1], b[1])


def progress_enabled() -> bool:
    """Progress bars on rank 0 only; A3PO_PROGRESS=0 turns them off (e.g. for plain cluster logs)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return rank0 and os.environ.get("A3PO_PROGRESS", "1") != "0"


def progress(iterable, desc: str, total: int | None = None, leave: bool = False):
    """tqdm on rank 0 (stderr; redrawn at most once a second when stderr is not a terminal), else the iterable.
    iterable=None with a total: a bar to `.update(n)` by hand (None where bars are off)."""
    if not progress_enabled():
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 1.0)


# Typed statistics: each says how it merges over micro-batches and ranks and what it reports.
@dataclass
class Mean:
    total: float = 0.0
    count: float = 0.0

    def merge(self, other: Mean) -> None:
        self.total, self.count = self.total + other.total, self.count + other.count

    def result(self) -> float:
        return self.total / self.count if self.count else float("nan")


@dataclass
class Sum:
    value: float = 0.0

    def merge(self, other: Sum) -> None:
        self.value += other.value

    def result(self) -> float:
        return self.value


@dataclass
class Max:
    value: float = -math.inf

    def merge(self, other: Max) -> None:
        self.value = max(self.value, other.value)

    def result(self) -> float:
        return self.value


@dataclass
class Ratio:
    """An exact ratio of two counts, each summed over micro-batches and ranks before dividing."""

    num: float = 0.0
    den: float = 0.0

    def merge(self, other: Ratio) -> None:
        self.num, self.den = self.num + other.num, self.den + other.den

    def result(self) -> float:
        return self.num / self.den if self.den else float("nan")


def _merge(stats: dict, name: str, stat) -> None:
    if name in stats:
        stats[name].merge(stat)
    else:
        stats[name] = stat


def _add(stats: dict, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    values = values.float()
    if mask is not None:
        values = values[mask]
    _merge(stats, name, Mean(values.sum().item(), values.numel()))


# Token counts a policy loss reports per micro-batch -> (the exact ratio metric they make, numerator or denominator)
_LOSS_COUNTS = {"n_clipped_pos": ("pos/clipfrac", "num"), "n_tokens_pos": ("pos/clipfrac", "den"),
                "n_clipped_neg": ("neg/clipfrac", "num"), "n_tokens_neg": ("neg/clipfrac", "den")}


def step_statistics(exp, weights, loss_outputs: list[dict], num_updates: int, *, shaper: str = "shaper",
                    correction=None, mismatch: bool = True) -> dict:
    """Typed statistics of this rank's rows, split by polarity (A > 0 positive, A < 0 negative).
    loss/pg_loss: the policy loss of a mini-batch (its micro-batch shares summed over micro-batches and DP
    ranks), averaged over the step's `num_updates` optimizer steps: independent of how batches are split.
    `weights`: the step shaper's token weights (None: no step shaper), `shaper` its name for the metric;
    `correction`: the rollout correction's output (None: off);
    `mismatch`: whether old_logprobs came from Megatron (False: they are vLLM's own, nothing to compare)."""
    stats: dict = {}
    mask = exp.response_mask
    lengths = mask.sum(1).float()
    if exp.old_entropy is not None:
        _add(stats, "entropy", exp.old_entropy, mask)
    if mismatch:  # vLLM's vs Megatron's log-probs of the same sampled tokens (same weights)
        log_r = (exp.old_logprobs - exp.rollout_logprobs).clamp(-20.0, 20.0)
        k3 = kl_penalty(exp.rollout_logprobs, exp.old_logprobs, "k3_unclamped")  # KL(pi_rollout || pi_old), its samples
        _add(stats, "mismatch/logp_abs_mean", log_r.abs(), mask)
        _add(stats, "mismatch/kl_k3", k3, mask)
        stats["mismatch/logp_abs_max"] = Max(log_r.abs()[mask].max().item() if mask.any() else 0.0)
        prob_err = (exp.rollout_logprobs.exp() - exp.old_logprobs.exp()).abs()[mask]
        stats["mismatch/prob_abs_max"] = Max(prob_err.max().item() if prob_err.numel() else 0.0)
    if exp.ref_logprobs is not None:  # KL(pi_old || pi_ref) of the sampled tokens, before this step's updates
        _add(stats, "ref/kl_k3", kl_penalty(exp.old_logprobs, exp.ref_logprobs, "k3_unclamped"), mask)
    for name, sign in (("pos", 1), ("neg", -1)):
        rows = exp.polarity == sign
        row_tokens = mask & rows[:, None]
        stats[f"{name}/count"] = Sum(rows.sum().item())
        if exp.old_entropy is not None:
            _add(stats, f"{name}/entropy", exp.old_entropy, row_tokens)
        _add(stats, f"{name}/length", lengths, rows)
        stats[f"{name}/advantage_mass"] = Sum((exp.advantages * row_tokens).sum().item())
        if mismatch:
            _add(stats, f"{name}/mismatch_kl_k3", k3, row_tokens)
            _add(stats, f"{name}/mismatch_logp_abs_mean", log_r.abs(), row_tokens)
        if correction is not None:
            _add(stats, f"{name}/correction_truncated_fraction", correction.truncated.float(), row_tokens)
            _add(stats, f"{name}/correction_masked_fraction", correction.rejected.float(), row_tokens)
    if correction is not None:
        _add(stats, "correction/truncated_fraction", correction.truncated.float(), mask)
        _add(stats, "correction/masked_fraction", correction.rejected.float(), mask)
        _add(stats, "correction/weight_mean", correction.weights, mask & ~correction.rejected)
    if weights is not None:
        _add(stats, f"{shaper}/shaped_token_fraction", ((weights != 1.0) & mask).float(), mask)
    for out in loss_outputs:
        for key, value in out.items():
            if key == "pg_loss_share":
                _merge(stats, "loss/pg_loss", Sum(value.item() / num_updates))
            elif key in _LOSS_COUNTS:
                metric, part = _LOSS_COUNTS[key]
                _merge(stats, metric, Ratio(**{part: value.item()}))
            elif value.dim() == 0:
                _add(stats, f"loss/{key}", value.reshape(1))
    return stats


def reduce_statistics(local: dict) -> dict:
    """Merge every rank's typed statistics (Mean / Sum / Max / Ratio) into plain numbers."""
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    merged: dict = {}
    for stats in gathered:
        for key, stat in stats.items():
            _merge(merged, key, copy.copy(stat))
    return {key: stat.result() for key, stat in merged.items()}


def batch_statistics(batch, rewards: torch.Tensor, n: int, overlong_penalty: torch.Tensor | None = None) -> dict:
    """From the whole rollout batch (identical on every rank). `rewards` include the overlong penalty, if any;
    correctness is the verifier's (reward before the penalty > 0)."""
    lengths = batch.response_lengths.float()
    penalty = overlong_penalty if overlong_penalty is not None else torch.zeros_like(rewards)
    correct = is_correct(rewards - penalty).float()
    per_prompt = correct.view(-1, n).sum(1)
    out = {
        "reward/mean": rewards.mean().item(), "reward/accuracy": correct.mean().item(),
        "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
        "response/truncated_fraction": batch.truncated.float().mean().item(),
    }
    if overlong_penalty is not None:
        out["reward/overlong_penalty"] = overlong_penalty.mean().item()
    for i in range(n + 1):  # how many prompts had i of n responses correct
        out[f"buckets/{i}_of_{n}"] = (per_prompt == i).float().mean().item()
    return out


def task_statistics(labels: list[str] | None, correct: torch.Tensor) -> dict:
    """The task's per-response labels (RewardFunction.labels; None: the task has none): `task/<label>_share` of
    the batch's responses and `task/<label>_accuracy` (the verifier's) among them. A label absent from a step
    has share 0 there (the report reads it so)."""
    if not labels:
        return {}
    out, verdicts = {}, correct.tolist()
    for label in sorted(set(labels)):
        rows = [ok for value, ok in zip(labels, verdicts) if value == label]
        out[f"task/{label}_share"] = len(rows) / len(labels)
        out[f"task/{label}_accuracy"] = sum(rows) / len(rows)
    return out


def update_statistics(updates: list[dict]) -> dict:
    norms = [u["grad_norm"] for u in updates]
    return {"train/grad_norm": sum(norms) / len(norms), "train/lr": updates[-1]["lr"],
            "train/skipped_updates": float(sum(not u["update_successful"] for u in updates))}


class MetricsLogger:
    """JSONL always (rank 0), wandb when a project is given (offline unless WANDB_MODE says otherwise)."""

    def __init__(self, output_dir: str, config: dict, wandb_project: str | None = None,
                 wandb_run_name: str | None = None):
        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config,
                                    dir=str(self.path.parent))

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (the writer was killed mid-line) is dropped with a warning;
    a bad line before the last is an error naming it (the file was edited or corrupted, not cut short)."""
    import sys

    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n < len(lines) - 1:
                raise RunFilesError(f"{path}:{number}: not a JSON line ({line[:60]!r}); the file is corrupted "
                                    "beyond a torn last line: fix or remove that line") from None
            print(f"warning: {path}:{number}: dropped a torn last line ({len(line)} characters; the run was "
                  "stopped while writing it)", file=sys.stderr)
    return rows


def trim_metrics(output_dir: str | Path, step: int) -> None:
    """Drop metrics.jsonl rows after `step` (written by the interrupted run after its last checkpoint)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [row for row in read_jsonl(path) if row["step"] <= step]  # a torn last line is dropped too
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    os.replace(tmp, path)


def plot_run(run_dir: str | Path) -> Path:
    """Write RUN_DIR/curves.png: reward/accuracy, validation, and entropy / length for positive vs negative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    panels = [("reward", ["reward/mean", "reward/accuracy"]), ("validation", ["val/avg@k", "val/pass@k"]),
              ("entropy", ["pos/entropy", "neg/entropy", "entropy"]), ("length", ["pos/length", "neg/length"]),
              ("clip fraction", ["pos/clipfrac", "neg/clipfrac"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
