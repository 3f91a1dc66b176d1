"""Sequence packing plans: which rows go to which data-parallel rank, and into which token-budget micro-batch.

Pure functions over sequence lengths (no torch.distributed): every rank computes the same plan from the same
gathered rollout batch, so DP ranks and pipeline stages agree on it without communicating.

Cost model (used to balance DP ranks): a sequence of L tokens costs a·L + b·L² per layer, forward:
the linear layers take 2·P FLOPs per token (P ≈ 4h² + 3h·ffn parameters per layer, GQA makes it a little
less), causal attention 2h FLOPs per (query, key) pair over L²/2 pairs, i.e. a = 2P and b = 2h. Only the ratio
matters, so `sequence_cost(L) = L + L² · h / P`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

# FP8 recipes (--fp8-recipe) whose token-dimension rule `token_multiple` knows.
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
# Transformer Engine (2.20, the image's) runs a linear layer in FP8 only when:
# - its input's leading rows (tokens) are a multiple of 8: transformer_engine/pytorch/utils.py
#   `assert_dim_for_fp8_exec` (a ValueError), called by module/linear.py, layernorm_linear.py and layernorm_mlp.py
#   on the input as the rank holds it, i.e. under sequence parallelism a column-parallel layer's shard of T/TP
#   tokens, before its all-gather;
# - the weight-gradient GEMM dW = dY^T X (module/linear.py, layout "NT") contracts over the gathered T tokens,
#   and cuBLASLt wants that leading dimension a multiple of 16: common/gemm/cublaslt_gemm.cu
#   `CanonicalizeGemmInput`, "Leading dimension requirement on A for FP8 GEMM. Caller must pad." (per-tensor
#   scaling: delayed, tensorwise) and "... on NVTE_BLOCK_SCALING GEMM. Caller must pad." (blockwise).
# megatron-core pads MoE tokens to the same 16 (fp8_utils.get_fp8_align_size; 32 for MXFP8, not offered here).
FP8_SHARD_ROWS, FP8_GEMM_TOKENS = 8, 16


@dataclass(frozen=True)
class CostModel:
    quadratic: float  # b / a = h / P: the attention term's weight relative to the linear term

    @classmethod
    def for_model(cls, hidden_size: int, ffn_hidden_size: int) -> "CostModel":
        return cls(quadratic=hidden_size / (4 * hidden_size ** 2 + 3 * hidden_size * ffn_hidden_size))

    def __call__(self, length: int) -> float:
        return length + self.quadratic * length * length


def balanced_partition(costs: list[float], parts: int) -> list[list[int]]:
    """Indices of `costs` split into `parts` groups of near-equal total cost (Karmarkar–Karp largest differencing
    for k-way partitions). Every group gets at least one index when there are at least `parts` costs."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if len(costs) < parts:
        raise ValueError(f"cannot split {len(costs)} sequences over {parts} data-parallel ranks")
    if parts == 1:
        return [list(range(len(costs)))]
    # A heap of partial partitions, largest spread first: (-spread, tie-break, sums, members).
    heap = []
    for i, cost in enumerate(costs):
        sums, members = [float(cost)] + [0.0] * (parts - 1), [[i]] + [[] for _ in range(parts - 1)]
        heapq.heappush(heap, (-float(cost), i, sums, members))
    while len(heap) > 1:
        _, tie, sums_a, members_a = heapq.heappop(heap)
        _, _, sums_b, members_b = heapq.heappop(heap)
        # Largest subset of one with the smallest of the other: the differences cancel.
        order_a = sorted(range(parts), key=lambda j: -sums_a[j])
        order_b = sorted(range(parts), key=lambda j: sums_b[j])
        sums = [sums_a[a] + sums_b[b] for a, b in zip(order_a, order_b)]
        members = [members_a[a] + members_b[b] for a, b in zip(order_a, order_b)]
        heapq.heappush(heap, (-(max(sums) - min(sums)), tie, sums, members))
    groups = [sorted(m) for m in heap[0][3]]
    for empty in [g for g in groups if not g]:  # only when one sequence outweighs all others together
        donor = max(groups, key=len)
        empty.append(donor.pop(min(range(len(donor)), key=lambda j: costs[donor[j]])))
    return sorted(groups, key=lambda g: g[0])


def token_budget_bins(lengths: list[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Indices of `lengths` packed into as few micro-batches as fit `max_tokens` each (first-fit decreasing),
    every pack's size rounded up to `multiple` (token_multiple: sequence parallelism, FP8).

    Raises ValueError for a sequence that does not fit the budget on its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if round_up(lengths[i], multiple) > max_tokens:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a budget of {max_tokens} tokens per "
                             "micro-batch; raise --max-tokens-per-gpu to at least --max-prompt-length + "
                             "--max-response-length")
        for b, total in enumerate(used):
            if round_up(total + lengths[i], multiple) <= max_tokens:
                bins[b].append(i)
                used[b] += lengths[i]
                break
        else:
            bins.append([i])
            used.append(lengths[i])
    return [sorted(b) for b in bins]


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (a micro-batch's token dimension: see token_multiple)."""
    return -(-n // multiple) * multiple


def token_multiple(tp: int, sequence_parallel: bool, fp8_recipe: str | None = None) -> int:
    """The multiple every micro-batch's token dimension T (a pack's length, a padded row's width) must have.

    Sequence parallelism scatters T over the TP ranks: T % TP == 0. FP8 (`fp8_recipe`, None: no FP8) also needs
    T % 16 == 0 and each rank's shard (T / TP under SP, else T) % 8 == 0 (see FP8_SHARD_ROWS above): T a multiple
    of lcm(16, 8 * TP) under SP (16 at TP <= 2, 32 at TP=4, 64 at TP=8), of 16 without."""
    shards = tp if sequence_parallel else 1
    if fp8_recipe is None:
        return shards
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"no token rule for FP8 recipe {fp8_recipe!r}; known: {', '.join(FP8_RECIPES)}")
    return math.lcm(FP8_GEMM_TOKENS, FP8_SHARD_ROWS * shards)


def token_multiple_of(cfg) -> int:
    """token_multiple for a run's config.Config (TP, --sequence-parallel, --fp8-format / --fp8-recipe)."""
    p, m = cfg.parallel, cfg.model
    return token_multiple(p.tensor_model_parallel_size, p.sequence_parallel, m.fp8_recipe if m.fp8_format else None)


@dataclass(frozen=True)
class MicroBatches:
    """One forward/backward call's micro-batches: positions into a rank's experience rows, one list each.
    packed: each micro-batch is one THD pack (padded to `multiple` tokens); else padded rows (the model pads
    their width to `multiple`: model_runner.model_width)."""
    rows: list[list[int]]
    packed: bool
    multiple: int = 1


@dataclass(frozen=True)
class RankPlan:
    rows: list[int]  # global rollout rows this DP rank holds, mini-batch after mini-batch
    logprob_pass: MicroBatches  # the old-log-prob pass over all of them
    mini_batches: list[MicroBatches]  # one optimizer step each (every PPO epoch repeats them)


@dataclass(frozen=True)
class Batching:
    """How a step's rows become micro-batches: `micro_batch_size` padded rows each, or (with `max_tokens`) packs
    of at most `max_tokens` tokens, rows assigned to DP ranks by balanced cost."""
    micro_batch_size: int
    max_tokens: int | None = None
    logprob_max_tokens: int | None = None  # default: max_tokens
    multiple: int = 1  # token dims are multiples of this (token_multiple: TP under SP, FP8's rule)
    cost: CostModel = CostModel(quadratic=0.0)

    def plan(self, lengths: list[int], mini_batch_rows: int, dp_size: int) -> list[RankPlan]:
        """Every DP rank's plan for one step (identical on every rank: computed from the same lengths)."""
        rows: list[list[int]] = [[] for _ in range(dp_size)]
        minis: list[list[MicroBatches]] = [[] for _ in range(dp_size)]
        for start in range(0, len(lengths), mini_batch_rows):
            # one split of this mini-batch's rows over the DP ranks, then each rank's micro-batches
            for rank, mine in enumerate(self._shares(lengths[start:start + mini_batch_rows], dp_size)):
                positions = list(range(len(rows[rank]), len(rows[rank]) + len(mine)))
                rows[rank] += [start + i for i in mine]
                minis[rank].append(self._micro_batches([lengths[start + i] for i in mine], positions,
                                                       self.max_tokens))
        return [RankPlan(rows=r, mini_batches=m,
                         logprob_pass=self._micro_batches([lengths[i] for i in r], list(range(len(r))),
                                                          self.logprob_max_tokens or self.max_tokens))
                for r, m in zip(rows, minis)]

    def _shares(self, lengths: list[int], dp_size: int) -> list[list[int]]:
        if self.max_tokens is None:  # contiguous equal shares (padded rows all cost the same)
            share = len(lengths) // dp_size
            return [list(range(rank * share, (rank + 1) * share)) for rank in range(dp_size)]
        return balanced_partition([self.cost(n) for n in lengths], dp_size)

    def _micro_batches(self, lengths: list[int], positions: list[int], max_tokens: int | None) -> MicroBatches:
        if max_tokens is None:
            size = self.micro_batch_size
            return MicroBatches([positions[i:i + size] for i in range(0, len(positions), size)], packed=False,
                                multiple=self.multiple)
        bins = token_budget_bins(lengths, max_tokens, self.multiple)
        return MicroBatches([[positions[i] for i in b] for b in bins], packed=True, multiple=self.multiple)


def plan_metrics(plans: list[RankPlan], lengths: list[int], width: int, batching: Batching) -> dict:
    """Tokens of one pass over the step's mini-batches: real ones and those computed (padding included), the
    most micro-batches a DP rank runs, and DP imbalance: ranks meet at every optimizer step, so it is
    Σ_mini-batches max_rank(estimated compute) / Σ_mini-batches mean_rank(estimated compute) (1.0: no waiting)."""
    real = computed = 0
    padded_width = round_up(width, batching.multiple)
    slowest = average = 0.0
    for m in range(len(plans[0].mini_batches)):
        costs = []
        for plan in plans:
            mini, cost = plan.mini_batches[m], 0.0
            for micro in mini.rows:
                row_lengths = [lengths[plan.rows[p]] for p in micro]
                real += sum(row_lengths)
                if mini.packed:
                    computed += round_up(sum(row_lengths), mini.multiple)
                    cost += sum(batching.cost(n) for n in row_lengths)
                else:
                    computed += len(micro) * padded_width
                    cost += len(micro) * batching.cost(padded_width)
            costs.append(cost)
        slowest, average = slowest + max(costs), average + sum(costs) / len(costs)
    return {"train/real_tokens": float(real), "train/computed_tokens": float(computed),
            "train/micro_batches": float(max(sum(len(m.rows) for m in p.mini_batches) for p in plans)),
            "train/dp_imbalance": slowest / average if average else 1.0}
