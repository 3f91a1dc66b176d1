"""Rollouts: vLLM colocated in the torchrun ranks, sampling settings, refit from the live Megatron model."""

from megatron_a3po.rollout.sampling import RolloutBatch, SamplingConfig

__all__ = ["RolloutBatch", "SamplingConfig"]
