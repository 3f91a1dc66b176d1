"""TP=2 and PP=2 (real 1F1B schedule) give the same loss and gradients as TP=1 and as HF transformers (fp32)."""

import pytest
import torch

from megatron_a3po.spawn import run_in_ranks

B, S, N_MICRO = 8, 32, 4  # 4 micro-batches of 2 sequences


def _batch(vocab: int):
    # Token 0 is the pad token: HF zero-initialises its embedding row (padding_idx) and gives it no gradient,
    # and RMSNorm of a zero vector is ill-conditioned, so it is left out of the batch.
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, vocab, (B, S + 1), generator=g)


def _hf_reference(hf_dir):
    """Plain HF transformers: mean next-token cross-entropy over the batch and its gradients."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokens = _batch(model.config.vocab_size)
    logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        grads.pop("lm_head.weight", None)
    return loss.item(), grads


def _megatron_loss_and_grads(hf_dir, tp, pp, vpp_layers=None):
    from megatron.core import tensor_parallel

    from megatron_a3po import parallel
    from megatron_a3po.config import Config
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models.families import load_hf_arch

    arch, _ = load_hf_arch(hf_dir)
    cfg = Config()
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.num_layers_per_virtual_pipeline_stage = vpp_layers
    cfg.model.make_vocab_size_divisible_by = 64  # 128 rows: no vocab padding at TP<=2
    vpp = arch.num_layers // pp // vpp_layers if vpp_layers else None
    parallel.init_model_parallel(parallel.ParallelSizes(tensor=tp, pipeline=pp, virtual_pipeline=vpp), seed=0)
    model = PolicyModel(cfg, arch, with_optimizer=False)
    model.load_hf(hf_dir)
    tokens = _batch(arch.vocab_size)
    total_tokens = tokens[:, 1:].numel()
    micro = [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens.chunk(N_MICRO)]

    def loss_fn(logits, batch):
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                                 batch["labels"].t().contiguous())
        loss = per_token.sum() / total_tokens
        return loss, {"loss_sum": per_token.sum().detach()}

    out = model.forward_backward(micro, loss_fn)
    loss = sum(m["loss_sum"].item() for m in out) / total_tokens if out else None
    grads = {name: t.clone() for name, t in model.hf_state(getter=lambda p: p.main_grad, dtype=torch.float32)}
    return loss, grads


# qwen2 (tied, qkv bias) runs every layout; llama (untied) and qwen3 (qk-norm) cover their mapping differences
# at fewer layouts to keep the suite short. Every layout is also checked against HF transformers directly.
LAYOUTS = {
    "qwen2": {"TP=1": (1, 1), "TP=2": (2, 1), "PP=2": (1, 2), "PP=2 VPP=2": (1, 2, 1)},
    "llama": {"TP=2": (2, 1), "PP=2": (1, 2)},
    "qwen3": {"TP=2": (2, 1)},
}


def _layouts_in_one_group(hf_dirs: dict, cases: list) -> dict:
    """Every (family, layout) case of this world size in one process group (layouts re-initialised in turn):
    spawning ranks costs more than the cases themselves."""
    return {(family, label): _megatron_loss_and_grads(hf_dirs[family], *layout) for family, label, layout in cases}


@pytest.fixture(scope="module")
def megatron_runs(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("parity")
    hf_dirs = {family: str(write_tiny_hf_checkpoint(root / family, family, seed=1)) for family in LAYOUTS}
    by_world: dict[int, list] = {}
    for family, layouts in LAYOUTS.items():
        for label, layout in layouts.items():
            by_world.setdefault(layout[0] * layout[1], []).append((family, label, layout))
    runs = {}
    for world, cases in by_world.items():
        for results in run_in_ranks(_layouts_in_one_group, world, (hf_dirs, cases)):  # one dict per rank
            for case, result in results.items():
                runs.setdefault(case, []).append(result)
    return hf_dirs, runs


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_parallel_layouts_match_hf_and_each_other(megatron_runs, family):
    hf_dirs, runs = megatron_runs
    ref_loss, ref_grads = _hf_reference(hf_dirs[family])
    baseline = None
    for label in LAYOUTS[family]:
        results = runs[(family, label)]
        losses = [loss for loss, _ in results if loss is not None]
        assert losses, f"{label}: no rank reported the loss"
        for loss in losses:
            assert loss == pytest.approx(ref_loss, abs=1e-5), f"{label} vs HF"
        for rank, (_, grads) in enumerate(results):
            assert sorted(grads) == sorted(ref_grads), label
            for name, ref in ref_grads.items():
                torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=0,
                                           msg=lambda m: f"{label} rank {rank} {name} vs HF: {m}")
                if baseline is not None:  # the same weights and batch at TP=1: agreement within 1e-5 too
                    torch.testing.assert_close(grads[name], baseline[name], atol=1e-5, rtol=0,
                                               msg=lambda m: f"{label} rank {rank} {name} vs TP=1: {m}")
        if label == "TP=1":
            baseline = results[0][1]
