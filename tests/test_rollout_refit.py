"""Megatron TP=2 and vLLM rollout TP=2 in the same 2 processes: refit makes vLLM's log-probs equal Megatron's."""

import torch

from megatron_a3po.spawn import run_in_ranks

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def _megatron_logprobs(model, sequences):
    """log p(token_t | prefix) from Megatron's vocab-parallel logits (forward only)."""
    from megatron.core import tensor_parallel

    tokens = torch.tensor(sequences)
    out = model.forward_backward(
        [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}],
        lambda logits, b: (torch.zeros(()), {"logp": -tensor_parallel.vocab_parallel_cross_entropy(
            logits.float().transpose(0, 1).contiguous(), b["labels"].t().contiguous()).t().detach()}),
        forward_only=True)
    return out[0]["logp"]


def _refit_body(hf_dir, rollout_tp):
    from megatron.core import tensor_parallel

    from megatron_a3po import parallel
    from megatron_a3po.config import Config
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models.families import load_hf_arch
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.rollout.sampling import SamplingConfig

    arch, _ = load_hf_arch(hf_dir)
    cfg = Config()
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.model.make_vocab_size_divisible_by = 64
    cfg.training.lr = cfg.training.min_lr = 1e-2
    parallel.init_model_parallel(parallel.ParallelSizes(tensor=2), seed=0)
    model = PolicyModel(cfg, arch)
    model.load_hf(hf_dir)
    engine = RolloutEngine(hf_dir, rollout_tp=rollout_tp, max_model_len=128, seed=0)
    engine.refit(model.hf_state())

    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(5, arch.vocab_size, (4, 24), generator=g).tolist()
    first = torch.tensor(engine.score(sequences))
    first_gap = (first - _megatron_logprobs(model, sequences)).abs().max().item()

    # One optimizer step changes Megatron's weights; vLLM keeps the old ones until refit.
    tokens = torch.tensor(sequences)

    def loss_fn(logits, b):
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                          b["labels"].t().contiguous())
        return ce.mean(), {}

    model.forward_backward([{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}], loss_fn)
    model.optimizer_step()
    trained = _megatron_logprobs(model, sequences)
    stale_gap = (torch.tensor(engine.score(sequences)) - trained).abs().max().item()
    engine.refit(model.hf_state())
    fresh_gap = (torch.tensor(engine.score(sequences)) - trained).abs().max().item()

    prompts = [[3, 10, 11, 12], [3, 20, 21]]
    batch = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=6, seed=1), pad_id=0)
    return dict(first_gap=first_gap, stale_gap=stale_gap, fresh_gap=fresh_gap, tokens=batch.tokens,
                mask=batch.response_mask, lengths=batch.response_lengths, truncated=batch.truncated)


def test_refit_makes_vllm_match_megatron_at_tp2(tmp_path):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    hf_dir = str(write_tiny_hf_checkpoint(tmp_path / "m", "qwen2", seed=4))
    results = run_in_ranks(_refit_body, 2, (hf_dir, 2), timeout=600, env=VLLM_ENV)
    for r in results:
        assert r["first_gap"] <= 1e-4, r["first_gap"]  # initial refit from Megatron (vLLM started with dummy weights)
        assert r["stale_gap"] > 1e-2, r["stale_gap"]  # after an optimizer step, before refit: they differ
        assert r["fresh_gap"] <= 1e-4, r["fresh_gap"]
    # Both ranks hold the same gathered rollout batch, prompt-major, prompts intact.
    assert torch.equal(results[0]["tokens"], results[1]["tokens"])
    tokens, mask = results[0]["tokens"], results[0]["mask"]
    assert tokens.shape[0] == 4 and tokens[0, :4].tolist() == [3, 10, 11, 12] and tokens[2, :3].tolist() == [3, 20, 21]
    assert mask.sum(1).tolist() == results[0]["lengths"].float().tolist()
    assert all(0 < n <= 6 for n in results[0]["lengths"].tolist())
