"""SamplingConfig validation and vLLM mapping, the paper's eval sampling, and the RolloutBatch layout."""

import pytest
import torch

from megatron_a3po.rollout.sampling import SamplingConfig, pack_rollouts


@pytest.mark.parametrize("overrides, flag", [
    (dict(n=0), "--rollout-n"),
    (dict(temperature=-0.1), "--rollout-temperature"),
    (dict(top_p=0.0), "--rollout-top-p"),
    (dict(top_p=1.5), "--rollout-top-p"),
    (dict(top_k=0), "--rollout-top-k"),
    (dict(top_k=-2), "--rollout-top-k"),
    (dict(max_new_tokens=0), "--max-response-length"),
])
def test_validate_names_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        SamplingConfig(**overrides).validate()


def test_validate_uses_the_prefix_and_accepts_valid_settings():
    with pytest.raises(ValueError, match="--eval-n"):
        SamplingConfig(n=0).validate(prefix="--eval")
    SamplingConfig().validate()
    SamplingConfig(n=1, temperature=0.0, top_p=1.0, top_k=1, max_new_tokens=1).validate()


def test_to_vllm_maps_every_field():
    cfg = SamplingConfig(n=4, temperature=0.7, top_p=0.9, top_k=-1, max_new_tokens=33, stop=["</s>", "\n\n"], seed=5)
    p = cfg.to_vllm(seed_offset=1002)
    assert (p.n, p.max_tokens, p.seed) == (4, 33, 1007)
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)
    assert p.top_k == 0  # vLLM's "disabled"
    assert p.stop == ["</s>", "\n\n"]
    assert p.logprobs == 0  # the sampled token's own log-prob
    assert SamplingConfig(top_k=20, seed=3).to_vllm().top_k == 20
    assert SamplingConfig(top_k=20, seed=3).to_vllm().seed == 3
    assert not SamplingConfig().to_vllm().stop
    # The config's stop list is copied, not shared with vLLM.
    assert p.stop is not cfg.stop


def test_pack_rollouts_layout():
    prompts = [[5, 6, 7], [8]]
    responses = [[[10, 11], [12]], [[13, 14, 15, 16], []]]
    logprobs = [[[-0.5, -1.0], [-2.0]], [[-0.1, -0.2, -0.3, -0.4], []]]
    truncated = [[False, False], [True, False]]
    b = pack_rollouts(prompts, responses, logprobs, truncated, pad_id=99)

    assert len(b) == 4 and b.group_size == 2
    P = 99
    assert b.tokens.tolist() == [
        [5, 6, 7, 10, 11],  # prompt 0, response 0 (row = prompt * n + j)
        [5, 6, 7, 12, P],
        [8, 13, 14, 15, 16],  # the widest row sets the width
        [8, P, P, P, P],  # empty response
    ]
    assert b.tokens.dtype == torch.long
    assert b.response_mask.tolist() == [
        [0, 0, 0, 1, 1],
        [0, 0, 0, 1, 0],
        [0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0],
    ]
    assert torch.allclose(b.rollout_logprobs, torch.tensor([
        [0, 0, 0, -0.5, -1.0],
        [0, 0, 0, -2.0, 0],
        [0, -0.1, -0.2, -0.3, -0.4],
        [0, 0, 0, 0, 0],
    ]))
    assert b.truncated.tolist() == [False, False, True, False]
    assert b.prompt_lengths.tolist() == [3, 3, 1, 1]
    assert b.response_lengths.tolist() == [2, 1, 4, 0]
    assert b.responses == [[10, 11], [12], [13, 14, 15, 16], []]


def test_engine_arguments_per_platform():
    """The CUDA path (sleep mode, CUDA graphs, memory fraction) and the CPU path, checked without building vLLM."""
    from megatron_a3po.rollout.engine import engine_kwargs

    common = dict(rollout_tp=2, max_model_len=4096, seed=3, dtype="bfloat16", load_format="dummy",
                  gpu_memory_utilization=0.6)
    gpu = engine_kwargs("/m", on_gpu=True, **common)
    assert gpu["enable_sleep_mode"] and not gpu["enforce_eager"] and gpu["gpu_memory_utilization"] == 0.6
    assert gpu["distributed_executor_backend"] == "external_launcher" and gpu["tensor_parallel_size"] == 2
    assert gpu["dtype"] == "bfloat16" and gpu["load_format"] == "dummy" and not gpu["enable_prefix_caching"]
    cpu = engine_kwargs("/m", on_gpu=False, **common)
    assert not cpu["enable_sleep_mode"] and cpu["enforce_eager"]
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        engine_kwargs("/m", on_gpu=True, **dict(common, gpu_memory_utilization=1.5))
