"""Run guards: non-finite updates, preemption, stop conditions.

`install_nonfinite_guard` makes the Megatron optimizer skip (and report grad_norm nan, update_successful False)
any update whose gradients hold NaN/Inf on any rank - megatron-core's fp32 / bf16 optimizers do not check that
themselves; `RunGuard` counts consecutive steps with skipped updates and turns SIGTERM into a flag the trainer
checks after each step.
"""

from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist

from megatron_a3po import platform


def install_nonfinite_guard(optimizer, chunks) -> None:
    """Make `optimizer.step()` skip the update when any rank's gradients hold NaN/Inf.

    It reads the gradients megatron-core steps with: the DDP grad buffers of `chunks` (every parameter's
    `main_grad`, already reduced across DP). With bf16 params or the distributed optimizer the optimizer's own
    parameters get their grads only inside `step()`, so reading those beforehand would see nothing.
    Skipped steps return (False, nan, None) - the same as megatron-core's own fp16 overflow skip - so
    `PolicyModel.optimizer_step` reports update_successful=False, grad_norm nan.
    """
    step = optimizer.step
    grad_buffers = [buffer.grad_data for chunk in chunks
                    for buffer in [*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", [])]]

    @torch.no_grad()
    def guarded_step():
        bad = nonfinite_flag(grad_buffers)  # device-side reduction: one host sync per step, below
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            optimizer.zero_grad()
            return False, float("nan"), None
        return step()

    optimizer.step = guarded_step


CHUNK_ELEMENTS = 1 << 24  # 16 Mi elements: 64 MiB of fp32 temporaries per slice, whatever the buffer's size


@torch.no_grad()
def nonfinite_flag(buffers, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """A 1-element float tensor on the device: 1.0 when any element of `buffers` is NaN or +-Inf, else 0.0.

    isfinite over fixed-size slices, each reduced at once: exact (no arithmetic on the values, so no overflow
    of a sum), and the temporaries are the size of a slice, not of the buffer (torch.isfinite is a composite:
    abs, ne, eq, mul; on the whole buffer that is a full fp32 copy plus bools: GiBs per GPU on Qwen2.5-32B)."""
    bad = torch.zeros(1, device=platform.device())
    for flat in buffers:
        flat = flat.view(-1)
        for start in range(0, flat.numel(), chunk):
            piece = flat[start:start + chunk]
            bad = torch.maximum(bad, torch.logical_not(torch.isfinite(piece).all()).float().reshape(1))
    return bad


def injected_nan_step() -> int | None:
    """Test hook: A3PO_TEST_INJECT_NAN_STEP=k[,j...] makes the policy loss NaN at those RL steps."""
    value = os.environ.get("A3PO_TEST_INJECT_NAN_STEP", "")
    return {int(v) for v in value.split(",") if v.strip()} or None


class RunGuard:
    """Stop conditions checked after every step: SIGTERM (preemption) and too many non-finite steps."""

    def __init__(self, max_consecutive_nan_steps: int):
        self.max_nan = max_consecutive_nan_steps
        self.consecutive_nan = 0
        self.terminate = False
        self.reason: str | None = None

    def install_signal_handler(self) -> None:
        def on_sigterm(signum, frame):
            self.terminate = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def check(self, step: int, metrics: dict) -> str | None:
        """Collective. None to continue, else 'preempted' or 'nonfinite' (every rank gets the same answer)."""
        bad = metrics.get("train/skipped_updates", 0) > 0 or not math.isfinite(metrics.get("train/grad_norm", 0.0))
        self.consecutive_nan = self.consecutive_nan + 1 if bad else 0
        flag = torch.tensor([1.0 if self.terminate else 0.0], device=platform.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.reason = "preempted"
        elif self.max_nan and self.consecutive_nan >= self.max_nan:
            self.reason = "nonfinite"
        return self.reason
