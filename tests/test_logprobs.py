"""Vocab-parallel log-prob / entropy / min-p proxy against torch.log_softmax over the full vocab.

Tolerances: fp32 results vs the fp32 torch reference and vs a float64 reference: max |diff| <= 1e-6
(logits ~ N(0, 1.5^2), vocab 96: log-probs down to ~ -12, where one fp32 ulp is ~1e-6 / 1.05);
logit gradients: <= 1e-6 absolute. bf16 logits: gradients within bf16 rounding (rtol 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from megatron_a3po.logprobs import logprobs_from_logits, vocab_parallel_logprobs

V = 96


def reference(z, t, temperature=1.0, vocab_size=None, kappa=None, dtype=torch.float64):
    """Plain torch over the full (unpadded) vocab."""
    z = z[..., : (vocab_size or z.shape[-1])].to(dtype) / temperature
    ls = torch.log_softmax(z, -1)
    lp = ls.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    proxy = None
    if kappa is not None:
        p = ls.exp()
        keep = p >= kappa * p.amax(-1, keepdim=True)
        q = torch.where(keep, p, torch.zeros_like(p))
        proxy = torch.log(q / q.sum(-1, keepdim=True)).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return lp, ent, proxy


def data(seed, shape=(4, 9), vocab=V, valid_vocab=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, vocab, generator=g) * 1.5
    t = torch.randint(0, valid_vocab or vocab, shape, generator=g)
    w1 = torch.randn(*shape, generator=g)
    w2 = torch.randn(*shape, generator=g)
    return z, t, w1, w2


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("temperature, chunk", [(1.0, None), (0.8, 5), (1.3, 1)])
def test_unsharded_matches_full_softmax(temperature, chunk):
    z, t, w1, w2 = data(0)
    zz = z.clone().requires_grad_()
    out = vocab_parallel_logprobs(zz, t, temperature=temperature, compute_entropy=True, entropy_grad=True, chunk_size=chunk)
    (out.logprobs * w1 + out.entropy * w2).sum().backward()
    for dtype in (torch.float32, torch.float64):
        zr = z.clone().requires_grad_()
        lp, ent, _ = reference(zr, t, temperature, dtype=dtype)
        (lp * w1 + ent * w2).sum().backward()
        assert max_diff(out.logprobs, lp) <= 1e-6
        assert max_diff(out.entropy, ent) <= 1e-6
        assert max_diff(zz.grad, zr.grad) <= 1e-6
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == t.shape


def test_chunking_is_bitwise_neutral_and_layout_agnostic():
    z, t, _, _ = data(1, shape=(7, 5))
    a = vocab_parallel_logprobs(z, t, compute_entropy=True, chunk_size=1)
    b = vocab_parallel_logprobs(z, t, compute_entropy=True, chunk_size=1000)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.entropy, b.entropy)
    # Megatron's [S, B, V] layout: same numbers, transposed
    c = vocab_parallel_logprobs(z.transpose(0, 1), t.transpose(0, 1), compute_entropy=True)
    assert torch.equal(c.logprobs, a.logprobs.transpose(0, 1))


def test_padded_vocab_is_excluded_and_gets_zero_grad():
    z, t, w1, w2 = data(2, valid_vocab=90)
    zz = z.clone().requires_grad_()
    out = vocab_parallel_logprobs(zz, t, vocab_size=90, compute_entropy=True, entropy_grad=True, chunk_size=4)
    (out.logprobs * w1 + out.entropy * w2).sum().backward()
    zr = z.clone().requires_grad_()
    lp, ent, _ = reference(zr, t, vocab_size=90)
    (lp * w1 + ent * w2).sum().backward()
    assert max_diff(out.logprobs, lp) <= 1e-6 and max_diff(out.entropy, ent) <= 1e-6
    assert max_diff(zz.grad, zr.grad) <= 1e-6
    assert torch.equal(zz.grad[..., 90:], torch.zeros_like(zz.grad[..., 90:]))


def test_entropy_backward_only_when_requested():
    z, t, w1, w2 = data(3)
    za = z.clone().requires_grad_()
    out = vocab_parallel_logprobs(za, t, compute_entropy=True)  # entropy_grad=False
    assert not out.entropy.requires_grad and out.logprobs.requires_grad
    (out.logprobs * w1).sum().backward()
    zb = z.clone().requires_grad_()
    lp, _, _ = reference(zb, t)
    (lp * w1).sum().backward()
    assert max_diff(za.grad, zb.grad) <= 1e-6
    # entropy differentiable but unused by the loss: same gradient (its backward term is skipped)
    zc = z.clone().requires_grad_()
    out_c = vocab_parallel_logprobs(zc, t, compute_entropy=True, entropy_grad=True)
    (out_c.logprobs * w1).sum().backward()
    assert torch.equal(zc.grad, za.grad)
    # entropy alone
    zd = z.clone().requires_grad_()
    vocab_parallel_logprobs(zd, t, compute_entropy=True, entropy_grad=True).entropy.mul(w2).sum().backward()
    ze = z.clone().requires_grad_()
    reference(ze, t)[1].mul(w2).sum().backward()
    assert max_diff(zd.grad, ze.grad) <= 1e-6


def test_bf16_logits_fp32_math():
    z, t, w1, _ = data(4)
    zb = z.to(torch.bfloat16).requires_grad_()
    out = vocab_parallel_logprobs(zb, t)
    (out.logprobs * w1).sum().backward()
    assert out.logprobs.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    zr = z.to(torch.bfloat16).float().requires_grad_()
    lp, _, _ = reference(zr, t, dtype=torch.float32)
    (lp * w1).sum().backward()
    assert max_diff(out.logprobs, lp) <= 1e-6  # same upcast inputs, fp32 math
    torch.testing.assert_close(zb.grad.float(), zr.grad, rtol=1e-2, atol=1e-3)


def test_minp_proxy_logprobs():
    z, t, _, _ = data(5)
    # make some targets the argmax so they are inside the proxy support
    t[:, ::3] = z[:, ::3].argmax(-1)
    out = vocab_parallel_logprobs(z, t, temperature=0.9, minp_kappa=0.02, chunk_size=3)
    _, _, proxy = reference(z, t, 0.9, kappa=0.02)
    finite = torch.isfinite(proxy)
    assert finite.any() and (~finite).any()
    assert torch.equal(torch.isfinite(out.proxy_logprobs), finite)
    assert max_diff(out.proxy_logprobs[finite], proxy[finite]) <= 1e-6
    assert not out.proxy_logprobs.requires_grad


@pytest.mark.parametrize("call, fragment", [
    (lambda z, t: vocab_parallel_logprobs(z, t[:, :3]), "targets"),
    (lambda z, t: vocab_parallel_logprobs(z, t + V), "targets"),
    (lambda z, t: vocab_parallel_logprobs(z, t.float()), "integer"),
    (lambda z, t: vocab_parallel_logprobs(z, t, temperature=0.0), "temperature"),
    (lambda z, t: vocab_parallel_logprobs(z, t, entropy_grad=True), "compute_entropy"),
    (lambda z, t: vocab_parallel_logprobs(z, t, vocab_size=V + 1), "vocab_size"),
    (lambda z, t: vocab_parallel_logprobs(z, t, minp_kappa=2.0), "minp_kappa"),
    (lambda z, t: vocab_parallel_logprobs(z, t, chunk_size=0), "chunk_size"),
])
def test_bad_inputs_raise(call, fragment):
    z, t, _, _ = data(6)
    with pytest.raises(ValueError, match=fragment):
        call(z, t)


def test_logprobs_from_logits_shortcut():
    z, t, _, _ = data(7)
    assert torch.equal(logprobs_from_logits(z, t), vocab_parallel_logprobs(z, t).logprobs)


# ------------------------------------------------------------------ TP = 2 on gloo

CASES = [  # (temperature, vocab_size, chunk_size, kappa)
    (1.0, None, None, None),
    (0.7, 90, 4, 0.02),  # padded vocab: 6 padding columns live on rank 1
    (1.2, 40, 3, None),  # rank 1 holds only padding
]


def _tp_rank(cases):
    """Each rank takes its vocab shard of the same logits and returns its outputs and its shard's grad."""
    import torch.distributed as dist

    group = dist.new_group(ranks=[0, 1])
    rank = dist.get_rank(group)
    results = []
    for i, (temperature, vocab_size, chunk, kappa) in enumerate(cases):
        z, t, w1, w2 = data(10 + i, valid_vocab=vocab_size)
        shard = z[..., rank * V // 2:(rank + 1) * V // 2].clone().requires_grad_()
        out = vocab_parallel_logprobs(shard, t, group, temperature=temperature, compute_entropy=True,
                                      entropy_grad=True, vocab_size=vocab_size, chunk_size=chunk, minp_kappa=kappa)
        (out.logprobs * w1 + out.entropy * w2).sum().backward()
        results.append((out.logprobs, out.entropy, out.proxy_logprobs, shard.grad))
    return results


@pytest.fixture(scope="module")
def tp_results():
    from megatron_a3po.spawn import run_in_ranks

    return run_in_ranks(_tp_rank, world_size=2, args=(CASES,), timeout=180)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tp2_equals_unsharded_fp32_reference(tp_results, case):
    temperature, vocab_size, chunk, kappa = CASES[case]
    z, t, w1, w2 = data(10 + case, valid_vocab=vocab_size)
    r0, r1 = tp_results[0][case], tp_results[1][case]
    for a, b in zip(r0[:2], r1[:2]):  # both ranks hold the full per-token results
        assert torch.equal(a, b)
    grad_tp = torch.cat([r0[3], r1[3]], dim=-1)
    for dtype in (torch.float32, torch.float64):
        zr = z.clone().requires_grad_()
        lp, ent, proxy = reference(zr, t, temperature, vocab_size, kappa, dtype=dtype)
        (lp * w1 + ent * w2).sum().backward()
        assert max_diff(r0[0], lp) <= 1e-6, "log-prob"
        assert max_diff(r0[1], ent) <= 1e-6, "entropy"
        assert max_diff(grad_tp, zr.grad) <= 1e-6, "logit gradient"
        if kappa is not None:
            finite = torch.isfinite(proxy)
            assert torch.equal(torch.isfinite(r0[2]), finite)
            assert max_diff(r0[2][finite], proxy[finite]) <= 1e-6
    # and the TP=2 numbers equal this module's own TP=1 path
    single = vocab_parallel_logprobs(z, t, temperature=temperature, compute_entropy=True, vocab_size=vocab_size)
    assert max_diff(r0[0], single.logprobs) <= 1e-6 and max_diff(r0[1], single.entropy) <= 1e-6
