"""vLLM colocated in every torchrun rank (external_launcher): generation, refit from Megatron, sleep/wake.

Ranks form rollout groups of `rollout_tp` consecutive ranks (vLLM builds its TP groups that way over the
existing torch.distributed world). Each group generates for its share of the prompts; its first rank sends the
results to every rank as tensors (gather.py), so every rank holds the whole batch, which the DP-sharded trainer splits.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron_a3po import platform
from megatron_a3po.metrics import progress_enabled
from megatron_a3po.rewards.timeout import RewardError
from megatron_a3po.rollout import cpu_shm, gather, log_filter
from megatron_a3po.rollout.sampling import RolloutBatch, SamplingConfig, pack_rollouts


def engine_kwargs(hf_path: str, *, rollout_tp: int, max_model_len: int, seed: int, dtype: str, load_format: str,
                  gpu_memory_utilization: float, on_gpu: bool) -> dict:
    """vLLM LLM(...) arguments. GPU: sleep mode (KV cache and weights released while Megatron trains), CUDA
    graphs, `gpu_memory_utilization`. CPU: eager mode, the KV cache is sized by VLLM_CPU_KVCACHE_SPACE instead."""
    if on_gpu and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    return dict(
        model=hf_path, tensor_parallel_size=rollout_tp, distributed_executor_backend="external_launcher",
        dtype=dtype, seed=seed, max_model_len=max_model_len, load_format=load_format,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=not on_gpu, enable_sleep_mode=on_gpu,
        enable_prefix_caching=False,  # refit changes weights under cached prefixes
        # log-probs of the distribution actually sampled (temperature applied): the behaviour policy that the
        # trainer's old log-probs (same temperature) are compared with and corrected towards
        logprobs_mode="processed_logprobs",
    )


class RolloutEngine:
    def __init__(self, hf_path: str, *, rollout_tp: int = 1, max_model_len: int = 1024, seed: int = 0,
                 dtype: str = "float32", gpu_memory_utilization: float = 0.5, cpu_kv_cache_gb: int = 1,
                 load_format: str = "dummy"):
        """`load_format="dummy"`: vLLM allocates weights without reading them; the first refit fills them
        from the live Megatron model, so rollouts always use exactly the policy being trained."""
        from vllm import LLM

        world, rank = dist.get_world_size(), dist.get_rank()
        if rollout_tp < 1 or world % rollout_tp:
            raise ValueError(f"--rollout-tensor-parallel-size {rollout_tp} must divide the world size {world}")
        self.rollout_tp, self.group, self.num_groups = rollout_tp, rank // rollout_tp, world // rollout_tp
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            # vLLM's CPU backend sizes its KV cache from this variable (GiB), not gpu_memory_utilization.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cpu_kv_cache_gb))))  # whole GiB
            # its all-reduce segments in /dev/shm: a name of this engine's own, a killed job's leftovers removed
            cpu_shm.remove_orphans()
            self.shm_ident = _agree_shm_ident(rollout_tp)
            cpu_shm.use_ident(self.shm_ident)
        threads = torch.get_num_threads()
        self.llm = LLM(**engine_kwargs(hf_path, rollout_tp=rollout_tp, max_model_len=max_model_len,
                                       seed=seed + self.group, dtype=dtype, load_format=load_format,
                                       gpu_memory_utilization=gpu_memory_utilization, on_gpu=self.on_gpu))
        torch.set_num_threads(threads)  # vLLM's CPU worker rebinds OpenMP threads; keep the trainer's setting
        self.memory = VllmMemory()  # which of vLLM's allocations are released; the sleep/wake plan
        # external_launcher: the model and vLLM's loggers live in this process, so the filter goes here
        self._log_filter = log_filter.install(set().union(*self.llm.collective_rpc(_nothing_to_load)))
        from megatron_a3po import parallel

        parallel.on_destroy(self.close)

    def close(self) -> None:
        """Tear vLLM down (its process groups live inside ours) before torch.distributed is destroyed."""
        if self.llm is not None:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            self.llm.llm_engine.engine_core.shutdown()
            cleanup_dist_env_and_memory()
            self.llm = None
            if not self.on_gpu:
                cpu_shm.release(self.shm_ident)
            log_filter.uninstall(self._log_filter)

    # ---- generation -------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, pad_id: int, step: int = 0,
                 round: int = 0, score: Callable[[list[int], list[list[int]]], list[float]] | None = None
                 ) -> RolloutBatch:
        """Generate `sampling.n` responses per prompt; collective over all ranks; returns the whole batch.

        `round` > 0: a further generation round of the same step (dynamic sampling), with random draws of its own.
        `score(prompt_indices, responses) -> rewards`: every rank scores a disjoint share of the batch (its rollout
        group's responses, split among the group's ranks) before the gather; the rewards travel with the
        gathered tokens (batch.rewards), so every rank holds identical rewards and each response is scored once.
        """
        sampling.validate()
        self.wake_up()
        shares = _split(list(range(len(prompts))), self.num_groups)
        share = shares[self.group]
        # One seed per prompt, spaced by n (vLLM gives sample j seed + j): no two prompts, samples or steps share
        # random draws, and rollouts do not depend on how many rollout groups there are.
        params = [sampling.to_vllm(seed_offset=(step * len(prompts) + i) * sampling.n + (round << 40)) for i in share]
        with platform.host_region():  # vLLM computes with its own tensors (plain CPU ones on its CPU backend)
            outputs = self.llm.generate([{"prompt_token_ids": prompts[i]} for i in share], params,
                                        use_tqdm=progress_enabled()) if share else []
        local = [_unpack(out) for out in outputs]
        scored: list[tuple[int, float]] = []  # (row of the batch, reward) this rank scored
        failure = None  # a rank whose scoring fails tells the others through the reward gather: all stop together
        if score is not None:
            rows = [(i, k) for i, result in zip(share, local) for k in range(len(result[0]))]
            mine = rows[dist.get_rank() % self.rollout_tp::self.rollout_tp]  # this rank's part of its group's share
            responses = dict(zip(share, (result[0] for result in local)))
            try:
                rewards = score([i for i, _ in mine], [responses[i][k] for i, k in mine]) if mine else []
                if len(rewards) != len(mine):
                    raise RewardError(f"the reward function returned {len(rewards)} rewards for {len(mine)} "
                                      "responses")
                scored = [(i * sampling.n + k, float(r)) for (i, k), r in zip(mine, rewards)]
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                failure = f"rank {dist.get_rank()}: {type(err).__name__}: {err}"
            rewards_or_failure = gather.share_rewards(scored, len(prompts) * sampling.n, failure)
            if isinstance(rewards_or_failure, str):
                raise RewardError("reward scoring failed, so this step's rewards cannot be trusted: "
                                  f"{rewards_or_failure}")
        per_prompt = gather.share_results(shares, local, self.group, self.rollout_tp, sampling.n)
        ordered = [per_prompt[i] for i in range(len(prompts))]
        batch = pack_rollouts(prompts, [o[0] for o in ordered], [o[1] for o in ordered], [o[2] for o in ordered],
                              pad_id)
        if score is not None:
            batch.rewards = rewards_or_failure
        return batch

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's log-prob of every token after the first, given its prefix (prompt_logprobs); local, no gather."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        with platform.host_region():
            outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            entries = out.prompt_logprobs[1:]  # the first token has no prefix
            result.append([entry[tok].logprob for tok, entry in zip(seq[1:], entries)])
        return result

    # ---- weights ------------------------------------------------------------------------------------------------

    def refit(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors streamed from the live Megatron model; vLLM re-shards for its own TP and
        re-packs CPU/GPU kernel layouts layer by layer. In memory only; never through disk. Wakes the weights
        only: the KV cache stays released until the next generation (split wake-up)."""
        self._apply(self.memory.before_refit())
        if not self.on_gpu:  # vLLM's CPU backend under CUDA emulation: its weights are host tensors
            weights = ((name, platform.emulated_host_copy(t)) for name, t in weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                          "is_checkpoint_format": True})
        self.llm.collective_rpc(_repack_tied_cpu_heads)
        self.memory.refitted()

    def sleep(self, keep_weights: bool = False) -> None:
        """Release vLLM's device memory for training: level 2 (weights and KV cache discarded; the next refit
        rewrites every weight), or level 1 with `keep_weights` (weights copied to host, for when no refit comes
        before the next generation)."""
        self._apply(self.memory.sleep(keep_weights))

    def wake_up(self) -> None:
        """Ready to generate: wake whatever is asleep (the KV cache; weights too after a level-1 sleep)."""
        self._apply(self.memory.before_generate())

    @property
    def sleeping(self) -> bool:
        return bool(self.memory.asleep)

    def _apply(self, calls: list[tuple[str, dict]]) -> None:
        """Make the planned vLLM calls. vLLM's CPU backend has no sleep mode (vllm/config/model.py
        ModelConfig.__post_init__ raises "Sleep mode is not supported on current platform." for
        enable_sleep_mode there), so on CPU the plan is kept, and its rules enforced, without the calls."""
        for method, kwargs in calls:
            if self.on_gpu:
                getattr(self.llm, method)(**kwargs)


class VllmMemory:
    """What vLLM holds on the device between phases, and the LLM.sleep / LLM.wake_up calls that move it.

    One step: generate (weights + KV cache) -> sleep(level=2): both discarded, nothing copied to host ->
    train -> wake_up(tags=["weights"]) -> refit rewrites every weight -> wake_up(tags=["kv_cache"]) just before
    the next generation, so the KV cache is never resident with Megatron's training memory or during refit.
    vLLM's rules this follows (0.32): a level-2 sleep saves the model's buffers (rotary caches ...) to host and
    restores them when "weights" wake (v1/worker/gpu_worker.py Worker.sleep/wake_up), but the parameters come
    back as uninitialised memory (device_allocator/sleep_mode_backend.py CuMemBackend.suspend offloads
    "weights" at level 1 only), hence "refit before generating". The executor drops a wake_up whose tag is
    not asleep with only a warning and a sleep while "weights" are asleep likewise (v1/executor/abstract.py
    Executor.wake_up/sleep), and the scheduler resumes only once nothing is asleep (v1/engine/core.py
    EngineCore.wake_up), so the plan asks for exactly the tags that are asleep, and wakes everything before
    generating."""

    ALL = ("weights", "kv_cache")

    def __init__(self):
        self.asleep: set[str] = set()
        self.weights_discarded = False  # a level-2 sleep since the last refit: the weights are garbage

    def sleep(self, keep_weights: bool = False) -> list[tuple[str, dict]]:
        if "weights" in self.asleep:  # vLLM ignores it (Executor.sleep); nothing more to free
            return []
        self.asleep = set(self.ALL)
        self.weights_discarded = not keep_weights
        return [("sleep", {"level": 1 if keep_weights else 2})]

    def before_refit(self) -> list[tuple[str, dict]]:
        if "weights" not in self.asleep:
            return []
        self.asleep.discard("weights")
        return [("wake_up", {"tags": ["weights"]})]

    def refitted(self) -> None:
        self.weights_discarded = False

    def before_generate(self) -> list[tuple[str, dict]]:
        if self.weights_discarded:
            raise RuntimeError("vLLM's weights were discarded by a level-2 sleep and not refit since: call "
                               "refit() before generating (or sleep(keep_weights=True) when no refit follows)")
        tags = [tag for tag in self.ALL if tag in self.asleep]
        self.asleep.clear()
        if not tags:
            return []
        return [("wake_up", {"tags": None if len(tags) == len(self.ALL) else tags})]


def _agree_shm_ident(rollout_tp: int) -> str:
    """Collective: one segment identifier per rollout group (its first rank's pid, a token drawn by rank 0)."""
    import secrets

    mine = (os.getpid(), secrets.token_hex(4))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    leader = dist.get_rank() // rollout_tp * rollout_tp
    return cpu_shm.make_ident(everyone[leader][0], everyone[0][1])


def _nothing_to_load(worker) -> set[str]:
    return log_filter.nothing_to_load(worker.model_runner.model)


def _repack_tied_cpu_heads(worker) -> int:
    """vLLM's CPU backend pre-packs each vocab matmul into a oneDNN handle when weights are processed. A tied
    lm_head shares embed_tokens' weight but loads nothing itself, so vLLM's in-place reload copies the new
    values into the shared weight and leaves the lm_head handle packed from the old ones (stale logits).
    Re-processing those vocab layers rebuilds the handle from the current weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    repacked = 0
    for module in worker.model_runner.model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear") and module.weight.numel():
            module.quant_method.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal shares (the first shares get the remainder)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(items[start: start + size])
        start += size
    return out


def _unpack(request_output) -> tuple[list, list, list]:
    responses, logprobs, truncated = [], [], []
    for completion in request_output.outputs:
        ids = list(completion.token_ids)
        responses.append(ids)
        if ids and not completion.logprobs:
            raise RuntimeError("vLLM returned no log-probs for a completion; SamplingConfig.to_vllm must request them")
        logprobs.append([entry[tok].logprob for tok, entry in zip(ids, completion.logprobs or [])])
        # "length" = cut by max_new_tokens or by max_model_len: either way the response did not finish.
        truncated.append(completion.finish_reason == "length")
    return responses, logprobs, truncated
