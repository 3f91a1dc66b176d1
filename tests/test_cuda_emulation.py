"""CUDA emulation (A3PO_EMULATE_CUDA=1, platform.py / cuda_emulation.py): the GPU's device and NCCL rules raise
on CPU, in 2 fresh gloo ranks, and the code users run on GPUs obeys them.

One spawn of 2 ranks checks the observable contract, then runs Megatron TP=2 with sequence parallelism from a
host batch (the model runner moves it to the device; odd sequence length, padded for SP) and compares loss
and every gradient with HF transformers run on the host (an independent reference, fp32)."""

from __future__ import annotations

import pytest
import torch

from megatron_a3po.models.tiny import write_tiny_hf_checkpoint
from megatron_a3po.spawn import run_in_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="emulation is off where CUDA exists")


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects the error's type and message
        return f"{type(exc).__name__}: {exc}"
    return None


class _HostTensorInBackward(torch.autograd.Function):
    """Identity whose backward mixes the (device) incoming gradient with a host tensor."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.ones(grad.shape)


def _contract() -> dict:
    import torch.distributed as dist

    from megatron_a3po import parallel, platform

    out = {"emulating": platform.emulating(), "device": str(platform.device())}
    out["mix"] = _error(lambda: torch.zeros(3, device="cuda") + torch.ones(3))
    out["scalar_mix"] = _error(lambda: torch.zeros(3, device="cuda") + torch.tensor(2.0))
    out["host_all_reduce"] = _error(lambda: dist.all_reduce(torch.ones(2)))
    summed = torch.ones(2, device="cuda")
    dist.all_reduce(summed)
    out["device_all_reduce"] = summed.tolist()
    gloo = dist.new_group(backend="gloo")
    host = torch.ones(2)
    dist.all_reduce(host, group=gloo)
    out["gloo_host_all_reduce"] = host.tolist()
    out["object_collective"] = _error(lambda: dist.all_gather_object([None, None], {"rank": parallel.rank()}))
    # Propagation: views, .data, parameters moved with .to(platform.device()), autograd's backward, x.device.
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    layer = torch.nn.Linear(3, 2).to(platform.device())
    layer(x).sum().backward()
    out["on_device"] = [platform.on_device(t) for t in (x[1:], x.data, layer.weight, layer.weight.grad, x.grad,
                                                          torch.empty(2, device=x.device))]
    out["x_device"] = str(x.device)
    out["backward_mix"] = _error(lambda: _HostTensorInBackward.apply(x).sum().backward())
    out["host_after_cpu"] = platform.on_device(x.cpu())
    out["numpy"] = _error(lambda: x.detach().numpy())
    before = platform.host_syncs()
    x.sum().item()
    x[0].tolist()
    bool(x[0, 0] > 0)
    torch.ones(1).item()  # a host tensor: no sync
    out["syncs"] = platform.host_syncs() - before
    from megatron_a3po.algorithms.aggregation import global_normaliser
    out["normaliser"] = global_normaliser([torch.ones(2, 3, dtype=torch.bool, device="cuda")], dp_group=None).global_tokens
    out["all_reduce_scalar"] = parallel.all_reduce_scalar(torch.tensor(1.5, device="cuda"), op="sum")
    return out


def _sp_step_vs_hf(hf_dir: str) -> dict:
    """Megatron TP=2 + sequence parallel on a host batch vs HF transformers (host, fp32): loss and gradients."""
    from transformers import AutoModelForCausalLM

    from megatron_a3po import config as C
    from megatron_a3po import parallel, platform
    from megatron_a3po.logprobs import vocab_parallel_logprobs
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models import families

    parallel.init_model_parallel(parallel.ParallelSizes(tensor=2), seed=0)
    arch, _ = families.load_hf_arch(hf_dir)
    cfg = C.Config()
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.parallel.sequence_parallel = True
    policy = PolicyModel(cfg, arch, with_optimizer=False)
    policy.load_hf(hf_dir)
    seq = torch.randint(3, arch.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # no pad token
    batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:]}  # 7 positions: padded to 8 for SP inside the runner
    total = batch["targets"].numel()

    def loss_fn(logits, mb):
        lp = vocab_parallel_logprobs(logits, mb["targets"], parallel.tp_group(), vocab_size=arch.vocab_size)
        loss = -lp.logprobs.sum() / total
        return loss, {"loss": loss.detach()}

    (metrics,) = policy.forward_backward([batch], loss_fn)
    grads = {name: platform.emulated_host_copy(g).float()
             for name, g in policy.hf_state(getter=lambda p: p.main_grad, dtype=torch.float32)}
    with platform.host_region():
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        logits = ref(batch["tokens"]).logits
        ref_loss = -torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).sum() / total
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        shared = sorted(set(grads) & set(ref_grads))
        worst = max((grads[n] - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-12)
                    for n in shared)
    return {"loss": platform.emulated_host_copy(metrics["loss"]).item(), "ref_loss": ref_loss.item(),
            "grads_compared": len(shared), "ref_grads": len(ref_grads), "worst_rel_grad_err": worst,
            "weight_is_device": platform.on_device(policy.chunks[0].module.embedding.word_embeddings.weight)}


def _body(hf_dir: str) -> dict:
    return {"contract": _contract(), "sp": _sp_step_vs_hf(hf_dir)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("emulation") / "qwen3"
    write_tiny_hf_checkpoint(hf_dir, "qwen3", seed=0)
    return run_in_ranks(_body, 2, (str(hf_dir),), env={"A3PO_EMULATE_CUDA": "1"})


def test_cuda_rules_hold_on_cpu(ranks):
    for rank in ranks:
        c = rank["contract"]
        assert c["emulating"] and c["device"] == "cuda:0"
        assert c["mix"] and "DeviceMismatchError" in c["mix"] and "aten.add" in c["mix"], c["mix"]
        assert c["scalar_mix"] is None  # a 0-dim host scalar mixes, as on CUDA
        assert c["host_all_reduce"] and "would fail under NCCL: host tensor in all_reduce" in c["host_all_reduce"]
        assert c["device_all_reduce"] == [2.0, 2.0]
        assert c["gloo_host_all_reduce"] == [2.0, 2.0]  # explicit gloo groups take host tensors
        assert c["object_collective"] is None
        assert all(c["on_device"]), c["on_device"]
        assert c["x_device"] == "cuda:0"
        assert c["backward_mix"] and "DeviceMismatchError" in c["backward_mix"]
        assert c["host_after_cpu"] is False
        assert c["numpy"] and "Use Tensor.cpu()" in c["numpy"]
        assert c["syncs"] == 3
        assert c["normaliser"] == 6.0
        assert c["all_reduce_scalar"] == 3.0


def test_sequence_parallel_step_from_a_host_batch_matches_hf(ranks):
    for rank in ranks:
        sp = rank["sp"]
        assert sp["weight_is_device"]
        assert sp["loss"] == pytest.approx(sp["ref_loss"], rel=1e-5)
        assert sp["grads_compared"] == sp["ref_grads"] > 0  # every HF parameter's gradient is compared
        assert sp["worst_rel_grad_err"] < 1e-4, sp


if __name__ == "__main__":
    pytest.main([__file__])
