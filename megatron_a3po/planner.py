"""Capacity planner (`a3po plan`): per-GPU memory of an RL job, computed before anything is launched.

Formulas (bytes per GPU; s = sequence, b = micro-batch, h = hidden, a = heads, L = layers, V = padded vocab,
t = TP, p = PP, d = data-parallel size x CP):
- Parameters: counted from the architecture in Megatron's layout: linear weights split by t, norms replicated,
  layers split by p, the vocab padded to a multiple of make_vocab_size_divisible_by x t; the worst pipeline
  stage (embedding or output layer) is counted.
- Model state, Megatron-LM docs "Distributed Optimizer": bf16 params + fp32 main grads (model_runner sets
  grad_reduce_in_fp32) + fp32 master params + Adam m, v = 18 bytes/param; the distributed optimizer shards the
  last 12 over d: 6 + 12/d. fp32 training: 16, or 8 + 8/d. A reference policy (--kl-coef > 0) adds its weights
  (2 bytes/param in bf16, 4 in fp32), resident through both phases.
- Activations, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
  16-bit activations per layer and micro-batch: sbh(34 + 5as/h)/t with sequence parallelism,
  sbh(10 + 24/t + 5as/(ht)) without; selective recompute drops the 5as/h attention-score term; full recompute
  keeps each layer's input, 2sbh (/t with SP), plus one layer's full activations while it is recomputed.
  1F1B keeps p micro-batches of L/p layers in flight on the first stage (L layers' worth; interleaved x
  (1 + (p-1)/(pv))). The 5as/h term is the stored attention-score matrix: Transformer Engine's fused/flash
  attention (--transformer-impl auto or transformer_engine on GPUs) never stores it, so it is dropped there and
  kept for --transformer-impl local. The 34 is derived for a 4h GeLU MLP; for the SwiGLU models here it is an
  approximation. s = max prompt + max response length (the padded worst case), divided by CP.
- Logits: b x s x V/t x 4 bytes (fp32 logits, or bf16 logits + their bf16 gradient) plus logprobs.py's two
  fp32 chunk buffers (each <= 32 MiB and <= 1/16 of the logits).
- Colocated vLLM: gpu_memory_utilization x GPU memory while it generates; inside that, its weights (split over
  the rollout TP), an estimate of its activations and CUDA graphs, and the KV cache (2 L (kv_heads / rollout TP)
  head_dim x 2 bytes per token), which must hold at least one max-length sequence or vLLM refuses to start.
  In sleep mode (level 2) vLLM frees all of it while Megatron trains and keeps no host copy of its weights (the
  refit rewrites them). The refit gathers one full tensor at a time (2 x the largest: its TP shards and the
  concatenation). --offload-train-during-rollout moves the gradients and optimizer state to the host while vLLM
  generates: the rollout phase holds the weights (and reference) only, so a larger gpu_memory_utilization (a
  larger KV cache) fits.
- Peak = model state + max(training phase, rollout phase) + a reserve for the CUDA context, NCCL buffers and
  allocator fragmentation (--reserve, 6 GiB by default).
- Checkpoint save (vLLM asleep: trainer.py saves between a sleep and the refit): on the device the model state and
  the reserve; the optimizer save (optimizer_state.py, megatron-core's memory-efficient fully_reshardable path)
  allocates no device buffer. On the host: save_host_bytes. Host memory per node is what each phase puts there
  (offloaded training state, the save's buffers); the processes' own baseline (libraries, CUDA context) is not
  counted.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

from megatron_a3po.errors import ConfigError
from megatron_a3po.models.families import padded_vocab_size as padded_vocab

GiB = 2**30
_VLLM_BATCHED_TOKENS = 8192  # vLLM's scheduler token budget per forward: sizes its activation estimate
_CUDA_GRAPHS = 1 * GiB  # vLLM's captured CUDA graphs (enforce_eager is off on GPUs)
_LOGPROB_CHUNK = 32 * 2**20  # logprobs._CHUNK_BYTES


def parse_memory(text: str) -> float:
    """'141GiB', '141G' (GiB), '80GB' (10^9), '1.5TiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)(B?)\s*", text, re.IGNORECASE)
    if not match or not match.group(1).replace(".", "", 1).isdigit():
        raise ConfigError(f"memory size {text!r} not understood; write e.g. 141GiB, 80GB or 141G")
    value, unit, binary, b = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    base = 1000 if (b and not binary and unit) else 1024  # GB = 10^9, G and GiB = 2^30
    return float(value) * base**power


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    gpu_memory: float  # bytes
    reserve: float = 6 * GiB
    host_memory: float = 0.0  # per node; 0: unknown (host memory is reported, not checked)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def param_counts(arch, tp: int, pp: int, vocab: int) -> tuple[int, float, int]:
    """(whole model params, params on the worst GPU, largest single tensor's element count)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    qkv = h * (q + 2 * kv) + (q + 2 * kv if arch.qkv_bias else 0)
    split = qkv + q * h + 3 * h * arch.ffn_hidden_size  # attention in/out + SwiGLU gate, up, down
    replicated = 2 * h + (2 * hd if arch.qk_norm else 0)  # two RMSNorms (+ q/k norms)
    embedding = vocab * h
    output = 0 if (arch.tie_word_embeddings and pp == 1) else vocab * h  # tied + PP>1: last stage keeps a copy
    total = arch.num_layers * (split + replicated) + embedding + h + (0 if arch.tie_word_embeddings else vocab * h)
    layers = arch.num_layers / pp * (split / tp + replicated)
    ends = (embedding + output) / tp + h if pp == 1 else max(embedding, output) / tp + h
    largest = max(embedding, qkv, 2 * h * arch.ffn_hidden_size)
    return total, layers + ends, largest


def model_state_bytes_per_param(half_precision: bool, distributed_optimizer: bool, d: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per parameter, per Megatron's distributed-optimizer docs."""
    if half_precision:  # bf16/fp16 params, fp32 main grads, fp32 master params + Adam m, v
        return 2.0, 4.0, 12.0 / d if distributed_optimizer else 12.0
    return 4.0, 4.0, 8.0 / d if distributed_optimizer else 8.0  # fp32 params and grads, Adam m, v


def save_host_bytes(per_gpu: float, half_precision: bool, distributed_optimizer: bool, d: int) -> tuple[float, float]:
    """Host bytes during a checkpoint save: (a rank that writes, i.e. DP rank 0 of its model-parallel group; any
    other DP rank). The weights go first (dist_checkpointing's preload_tensors stages the writer's device tensors on
    the host: 2 or 4 bytes/param) and are freed before the optimizer's save.
    Distributed optimizer (DistributedOptimizer.get_parameter_state_dp_zero with use_gloo_comm=True,
    return_on_all_ranks=False, megatron/core/optimizer/distrib_optimizer.py): DP rank 0 allocates the world tensors
    of param, exp_avg, exp_avg_sq (12 bytes/param); per bucket (one per buffer: overlap_grad_reduce is off) and
    state key it receives the gather into a list as large as the bucket (4 bytes/param) and concatenates it
    (4 more), while the previous key's list and concatenation are still referenced until rebound: 3 such buffers
    at once, 12 bytes/param. Every DP rank first copies its own shards into 3 host buffers (12/d bytes/param).
    The host tensors are written as they are (preload_tensors copies nothing already on the host).
    Plain optimizer: the writer stages its fp32 master params and Adam moments (12 bytes/param; 8 in fp32)."""
    weights = (2.0 if half_precision else 4.0) * per_gpu
    if distributed_optimizer:
        shards = 12.0 * per_gpu / d
        return max(weights, 12.0 * per_gpu + 12.0 * per_gpu + shards), shards
    return max(weights, (12.0 if half_precision else 8.0) * per_gpu), 0.0


def writer_ranks_per_node(tp: int, cp: int, dp: int, nodes: int, gpus_per_node: int) -> list[int]:
    """How many ranks of each node write a checkpoint (DP rank 0 of the DP x CP group). Megatron's rank order is
    tp-cp-(ep)-dp-pp: rank = tp_rank + tp (cp_rank + cp (dp_rank + dp pp_rank)), so a writer has
    (rank // tp) % (cp dp) == 0."""
    g = gpus_per_node
    return [sum(1 for r in range(n * g, (n + 1) * g) if (r // tp) % (cp * dp) == 0) for n in range(nodes)]


def activation_bytes_per_layer(s: float, b: int, h: int, a: int, t: int, sp: bool, recompute: str | None,
                               flash_attention: bool = False) -> float:
    """Korthikanti et al. 2022, per transformer layer and micro-batch (16-bit activations)."""
    # softmax input/output and dropout mask of the attention scores; not stored by flash attention and not kept
    # by selective recompute
    scores = 0 if (flash_attention or recompute == "selective") else 5 * a * s / h
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)  # only the layer's input
    if sp:
        return s * b * h * (34 + scores) / t
    return s * b * h * (10 + 24 / t + scores / t)


@dataclass
class Plan:
    lines: dict[str, float]  # component -> bytes per GPU
    notes: dict[str, str] = field(default_factory=dict)
    train_peak: float = 0.0
    rollout_peak: float = 0.0
    kv_tokens: float = 0.0
    max_model_len: int = 0
    max_utilization: float = 0.0  # the largest gpu_memory_utilization whose rollout phase fits
    max_kv_tokens: float = 0.0  # the KV cache at max_utilization
    limit: float = 0.0
    problems: list[str] = field(default_factory=list)
    save_peak: float = 0.0  # device, during a checkpoint save
    host: dict[str, float] = field(default_factory=dict)  # phase -> host bytes on the busiest node

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def model_state(self) -> float:
        """Resident through both phases: weights, gradients, optimizer, and the reference policy if any."""
        return sum(self.lines.get(k, 0.0) for k in ("weights", "gradients", "optimizer", "reference"))

    @property
    def rollout_state(self) -> float:
        """Resident while vLLM generates: the model state less what --offload-train-during-rollout moves out."""
        return self.model_state - self.lines.get("offloaded", 0.0)


def plan(cfg, arch, layout: Layout) -> Plan:
    """Per-GPU memory of `cfg` (a config.Config) for `arch` (models.ModelArch) on `layout`."""
    p, m, t, rl = cfg.parallel, cfg.model, cfg.training, cfg.rl
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if layout.world % (tp * pp * cp):
        raise ConfigError(f"{layout.world} GPUs are not divisible by TP {tp} x PP {pp} x CP {cp}; change "
                         "--nodes/--gpus-per-node or the parallel sizes")
    dp = layout.world // (tp * pp * cp)
    half = m.bf16 or m.fp16
    vocab = padded_vocab(arch.vocab_size, m.make_vocab_size_divisible_by, tp)
    total, per_gpu, largest = param_counts(arch, tp, pp, vocab)
    w, g, o = model_state_bytes_per_param(half, t.use_distributed_optimizer, dp * cp)
    lines = {"weights": per_gpu * w, "gradients": per_gpu * g, "optimizer": per_gpu * o}
    if rl.kl_coef > 0:  # the frozen reference policy (KL penalty): same layout, weights only, resident throughout
        lines["reference"] = per_gpu * (2.0 if half else 4.0)

    seq = rl.max_prompt_length + rl.max_response_length
    flash = m.transformer_impl != "local"  # GPUs: Transformer Engine's fused attention
    if t.max_tokens_per_gpu:  # one pack of up to max_tokens_per_gpu tokens per micro-batch
        s, b = t.max_tokens_per_gpu / cp, 1
        # at most this many packs (every sequence at its longest); real length distributions need fewer
        micro_batches = max(1, math.ceil(rl.ppo_mini_batch_size * rl.rollout_n * seq / (dp * t.max_tokens_per_gpu)))
    else:
        s, b = seq / cp, t.micro_batch_size
        micro_batches = max(1, rl.ppo_mini_batch_size * rl.rollout_n // (b * dp))
    per_layer = activation_bytes_per_layer(s, b, arch.hidden_size, arch.num_attention_heads, tp, p.sequence_parallel,
                                           m.recompute_granularity, flash)
    in_flight = arch.num_layers / pp * min(pp, micro_batches)  # 1F1B: first stage
    vpp = p.num_layers_per_virtual_pipeline_stage
    if vpp and pp > 1:
        v = arch.num_layers // pp // vpp
        in_flight *= 1 + (pp - 1) / (pp * v)
    acts = in_flight * per_layer
    if m.recompute_granularity == "full":  # the layer being recomputed holds all of its activations
        acts += activation_bytes_per_layer(s, b, arch.hidden_size, arch.num_attention_heads, tp,
                                           p.sequence_parallel, None, flash)
    lines["activations"] = acts
    # the old-log-prob pass (forward only) may use a larger token budget: its logits can be the largest
    logit_tokens = max(b * s, (t.log_probs_max_tokens_per_gpu or 0) / cp)
    logits = logit_tokens * vocab / tp * 4
    lines["logits"] = logits + 2 * min(_LOGPROB_CHUNK, logits / 16)

    dtype_bytes = 2 if half else 4
    rtp = rl.rollout_tensor_parallel_size
    budget = rl.gpu_memory_utilization * layout.gpu_memory
    vllm_weights = total * dtype_bytes / rtp
    vllm_acts = _VLLM_BATCHED_TOKENS * (2 * arch.ffn_hidden_size + 4 * arch.hidden_size) / rtp * dtype_bytes
    kv_per_token = 2 * arch.num_layers * math.ceil(arch.num_query_groups / rtp) * arch.head_dim * dtype_bytes
    lines["vllm"] = budget
    lines["vllm_weights"] = vllm_weights
    lines["vllm_kv_cache"] = max(0.0, budget - vllm_weights - vllm_acts - _CUDA_GRAPHS)
    lines["refit"] = 2 * largest * dtype_bytes
    lines["reserve"] = layout.reserve
    if getattr(t, "offload_train_during_rollout", False):  # grads + optimizer state wait on the host
        lines["offloaded"] = lines["gradients"] + lines["optimizer"]
    writer, other = save_host_bytes(per_gpu, half, t.use_distributed_optimizer, dp * cp)
    lines["save_host_writer"], lines["save_host_other"] = writer, other

    from megatron_a3po.job import rollout_max_model_len

    result = Plan(lines=lines, limit=layout.gpu_memory, max_model_len=rollout_max_model_len(cfg))  # as rl_job asks
    state = result.model_state
    writers = writer_ranks_per_node(tp, cp, dp, layout.nodes, layout.gpus_per_node)
    result.host = {"rollout": layout.gpus_per_node * lines.get("offloaded", 0.0),
                   "train": 0.0,  # level-2 sleep: vLLM keeps no host copy of its weights
                   "save": max(k * writer + (layout.gpus_per_node - k) * other for k in writers)}
    result.save_peak = state + layout.reserve  # no device buffer on the memory-efficient path; vLLM asleep
    result.notes = {"params": f"{total / 1e9:.2f}B", "params_per_gpu": f"{per_gpu / 1e9:.2f}B", "dp": str(dp),
                    "seq": str(seq), "kv_per_token": str(kv_per_token), "writers_per_node": str(max(writers))}
    result.train_peak = state + acts + lines["logits"] + layout.reserve
    result.rollout_peak = result.rollout_state + budget + lines["refit"] + layout.reserve
    result.kv_tokens = lines["vllm_kv_cache"] / kv_per_token
    free_for_vllm = layout.gpu_memory - (result.rollout_state + lines["refit"] + layout.reserve)
    result.max_utilization = max(0.0, math.floor(free_for_vllm / layout.gpu_memory * 100) / 100)
    kv_at_max = result.max_utilization * layout.gpu_memory - vllm_weights - vllm_acts - _CUDA_GRAPHS
    result.max_kv_tokens = max(0.0, kv_at_max) / kv_per_token
    gib = layout.gpu_memory / GiB
    if result.train_peak > layout.gpu_memory:
        result.problems.append(f"training phase needs {result.train_peak / GiB:.1f} GiB > {gib:.0f} GiB")
    if result.rollout_peak > layout.gpu_memory:
        resident = "the weights (grads + optimizer offloaded)" if "offloaded" in lines else "the model state"
        result.problems.append(f"rollout phase needs {result.rollout_peak / GiB:.1f} GiB > {gib:.0f} GiB "
                               f"(gpu_memory_utilization {rl.gpu_memory_utilization} on top of {resident})")
    for phase, need in result.host.items():
        if layout.host_memory and need > layout.host_memory:
            result.problems.append(f"{'checkpoint save' if phase == 'save' else phase} phase needs {need / GiB:.0f} GiB "
                                   f"of host memory on one node > {layout.host_memory / GiB:.0f} GiB")
    if result.kv_tokens < result.max_model_len:
        result.problems.append(f"vLLM KV cache holds {result.kv_tokens:.0f} tokens, less than one sequence of "
                               f"{result.max_model_len}: vLLM refuses to start")
    return result


def suggestions(cfg, arch, layout: Layout, gpus_per_node: int) -> list[tuple[str, Plan]]:
    """Single-knob changes, each re-planned; the ones that fit come first."""
    p, m, t, rl = cfg.parallel, cfg.model, cfg.training, cfg.rl
    candidates: list[tuple[str, dict]] = []
    if m.recompute_granularity != "full":
        candidates.append(("--recompute-granularity full", {"model.recompute_granularity": "full"}))
    if not t.use_distributed_optimizer:
        candidates.append(("--use-distributed-optimizer", {"training.use_distributed_optimizer": True}))
    if t.max_tokens_per_gpu and t.max_tokens_per_gpu // 2 >= rl.max_prompt_length + rl.max_response_length:
        half = t.max_tokens_per_gpu // 2
        candidates.append((f"--max-tokens-per-gpu {half}", {"training.max_tokens_per_gpu": half}))
    elif not t.max_tokens_per_gpu and t.micro_batch_size > 1:
        mb = t.micro_batch_size // 2
        candidates.append((f"--micro-batch-size {mb}", {"training.micro_batch_size": mb}))
    tp = p.tensor_model_parallel_size * 2
    if (tp <= gpus_per_node and arch.num_attention_heads % tp == 0 and arch.num_query_groups % tp == 0):
        candidates.append((f"--tensor-model-parallel-size {tp} --sequence-parallel",
                           {"parallel.tensor_model_parallel_size": tp, "parallel.sequence_parallel": True}))
    pp = p.pipeline_model_parallel_size * 2
    if arch.num_layers % pp == 0 and layout.world % (p.tensor_model_parallel_size * pp * p.context_parallel_size) == 0:
        candidates.append((f"--pipeline-model-parallel-size {pp}", {"parallel.pipeline_model_parallel_size": pp}))
    if (m.bf16 or m.fp16) and not getattr(t, "offload_train_during_rollout", False):
        candidates.append(("--offload-train-during-rollout", {"training.offload_train_during_rollout": True}))
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        candidates.append(("--sequence-parallel", {"parallel.sequence_parallel": True}))
    base = plan(cfg, arch, layout)
    util = base.max_utilization
    if util > 0 and util < rl.gpu_memory_utilization:
        candidates.append((f"--gpu-memory-utilization {util:.2f}", {"rl.gpu_memory_utilization": util}))
    elif base.kv_tokens < base.max_model_len:
        if util > rl.gpu_memory_utilization:
            candidates.append((f"--gpu-memory-utilization {util:.2f}", {"rl.gpu_memory_utilization": util}))
        rtp = rl.rollout_tensor_parallel_size * 2
        if layout.world % rtp == 0 and rtp <= gpus_per_node:
            candidates.append((f"--rollout-tensor-parallel-size {rtp}", {"rl.rollout_tensor_parallel_size": rtp}))
    out = []
    for flag, changes in candidates:
        changed = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, name = key.split(".")
            setattr(getattr(changed, section), name, value)
        try:
            out.append((flag, plan(changed, arch, layout)))
        except ValueError:
            continue
    return sorted(out, key=lambda fp: (not fp[1].fits, max(fp[1].train_peak, fp[1].rollout_peak)))
