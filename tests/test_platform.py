"""platform.py: on a machine without CUDA, megatron-core's CUDA call sites run on CPU (checked in a fresh rank)."""

import pytest
import torch

from megatron_a3po.spawn import run_in_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compatibility layer is off with CUDA")


def _cpu_compat_body():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_a3po import parallel

    parallel.init_model_parallel(parallel.ParallelSizes(), seed=5)
    checks = {}
    # 1. device redirection (schedules.py / clip_grads.py allocate with device="cuda").
    checks["zeros_cuda"] = torch.zeros(3, device="cuda").device.type
    checks["to_cuda"] = torch.ones(2).to("cuda").device.type
    checks["dot_cuda"] = torch.ones(2).cuda().device.type
    checks["current_device"] = torch.empty(1, device=torch.cuda.current_device()).device.type
    # 2. type names megatron compares against.
    checks["type_name"] = torch.ones(1).type()
    # 3. RNG tracker: a fork is reproducible and leaves the outer stream untouched.
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    after_first = torch.get_rng_state()
    checks["outer_untouched"] = bool(torch.equal(before, after_first))
    with tracker.fork():
        b = torch.rand(4)
    checks["fork_advances"] = not torch.equal(a, b)
    # 4. clip_grad > 0 path: megatron's norm + scaling vs torch's clip_grad_norm_.
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    ref = [p.grad.clone() for p in params]
    ref_norm = torch.cat([g.flatten() for g in ref]).norm()
    norm = get_grad_norm_fp32([p.grad for p in params])
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    checks["norm_error"] = abs(norm - ref_norm.item())
    checks["clipped_norm"] = torch.cat([p.grad.flatten() for p in params]).norm().item()
    checks["direction_kept"] = all(torch.allclose(p.grad * norm, g, rtol=1e-4) for p, g in zip(params, ref))
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
    return checks


def test_megatron_cuda_call_sites_run_on_cpu():
    (checks,) = run_in_ranks(_cpu_compat_body, 1)
    assert checks["zeros_cuda"] == checks["to_cuda"] == checks["dot_cuda"] == checks["current_device"] == "cpu"
    assert checks["type_name"] == "torch.cuda.FloatTensor"
    assert checks["outer_untouched"] and checks["fork_advances"]
    assert checks["norm_error"] < 1e-4
    assert checks["clipped_norm"] == pytest.approx(1.0, abs=1e-5)
    assert checks["direction_kept"]
