"""Capacity planner against hand calculations (a dense 7B: Llama-2-7B's public architecture) and Megatron's
documented formulas (distributed-optimizer bytes/param; Korthikanti et al. 2022 activations), and `a3po plan` on
every paper config for 16 x H200."""

from __future__ import annotations

import json
import math

import pytest

from megatron_a3po import config as C
from megatron_a3po import planner as P
from megatron_a3po.cli import a3po
from megatron_a3po.models.families import arch_from_hf_config
from helpers import REPO

GiB = 2**30
LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
ARCH = arch_from_hf_config(LLAMA2_7B)
H, FFN, L, A, V = 4096, 11008, 32, 32, 32000
PER_LAYER = 4 * H * H + 3 * H * FFN + 2 * H  # q,k,v,o + gate,up,down + two RMSNorms
TOTAL = L * PER_LAYER + 2 * V * H + H  # + embedding, output layer, final norm


def cfg_for(*flags: str):
    cfg, _ = C.parse_args(["--tiny-model", "llama", "--bf16", "--max-prompt-length", "1024", "--max-response-length",
                           "1024", "--micro-batch-size", "1", "--rollout-batch-size", "64", "--ppo-mini-batch-size",
                           "8", "--rollout-n", "8", *flags])
    return cfg


def test_llama2_7b_parameter_count_by_hand():
    assert TOTAL == 6_738_415_616  # the published Llama-2-7B count
    total, per_gpu, largest = P.param_counts(ARCH, tp=1, pp=1, vocab=V)
    assert total == TOTAL and per_gpu == TOTAL and largest == V * H
    # TP=2: linear weights and the (already 128 x 2 aligned) vocab split, norms replicated
    _, per_gpu, _ = P.param_counts(ARCH, tp=2, pp=1, vocab=P.padded_vocab(V, 128, 2))
    assert per_gpu == L * ((4 * H * H + 3 * H * FFN) / 2 + 2 * H) + V * H + H
    # PP=2: half the layers; the worst stage holds one of embedding / output layer (+ final norm counted)
    _, per_gpu, _ = P.param_counts(ARCH, tp=1, pp=2, vocab=V)
    assert per_gpu == L / 2 * PER_LAYER + V * H + H
    assert P.padded_vocab(151936, 128, 8) == 152576 and P.padded_vocab(152064, 128, 2) == 152064


def test_model_state_follows_megatron_distributed_optimizer_docs():
    """docs/source/api-guide/dist_optimizer.md: bf16 params + fp32 grads = 18 bytes/param, 6 + 12/d sharded."""
    assert sum(P.model_state_bytes_per_param(True, False, 8)) == 18
    for d in (1, 2, 8, 64):
        assert sum(P.model_state_bytes_per_param(True, True, d)) == pytest.approx(6 + 12 / d)
        assert sum(P.model_state_bytes_per_param(False, True, d)) == pytest.approx(8 + 8 / d)
    assert sum(P.model_state_bytes_per_param(False, False, 8)) == 16
    layout = P.Layout(nodes=1, gpus_per_node=8, gpu_memory=141 * GiB)
    plain = P.plan(cfg_for("--tensor-model-parallel-size", "1"), ARCH, layout)
    state = plain.lines["weights"] + plain.lines["gradients"] + plain.lines["optimizer"]
    assert state == 18 * TOTAL  # ~113 GiB: a dense 7B does not train unsharded on one 80 GiB GPU
    assert state / GiB == pytest.approx(112.96, abs=0.01)
    sharded = P.plan(cfg_for("--use-distributed-optimizer"), ARCH, layout)  # DP = 8
    assert sharded.lines["weights"] + sharded.lines["gradients"] + sharded.lines["optimizer"] == 7.5 * TOTAL


def test_reference_policy_adds_its_weights_to_both_phases():
    """--kl-coef builds a frozen reference (bf16 weights only, 2 bytes/param, same layout) resident throughout."""
    layout = P.Layout(nodes=1, gpus_per_node=8, gpu_memory=141 * GiB)
    plain = P.plan(cfg_for("--tensor-model-parallel-size", "1"), ARCH, layout)
    with_ref = P.plan(cfg_for("--tensor-model-parallel-size", "1", "--kl-coef", "0.1"), ARCH, layout)
    assert "reference" not in plain.lines and with_ref.lines["reference"] == 2 * TOTAL
    assert with_ref.model_state - plain.model_state == 2 * TOTAL
    assert with_ref.train_peak - plain.train_peak == with_ref.rollout_peak - plain.rollout_peak == 2 * TOTAL


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_activations_follow_korthikanti_et_al(recompute):
    """Table 2 of "Reducing Activation Recomputation": sbhL(34 + 5as/h) without parallelism; /t with TP + SP;
    34sbhL/t with selective recompute; full recompute keeps 2sbh per layer (+ one layer being recomputed)."""
    s, b = 2048, 2
    layout = P.Layout(nodes=1, gpus_per_node=8, gpu_memory=141 * GiB)
    flash_flags = ["--micro-batch-size", str(b)] + (["--recompute-granularity", recompute] if recompute else [])
    flags = flash_flags + ["--transformer-impl", "local"]  # Megatron's local attention stores the scores
    full_layer = s * b * H * (34 + 5 * A * s / H)
    expected = {None: L * full_layer, "selective": L * 34 * s * b * H, "full": L * 2 * s * b * H + full_layer}
    got = P.plan(cfg_for(*flags), ARCH, layout).lines["activations"]
    assert got == pytest.approx(expected[recompute])
    got = P.plan(cfg_for(*flags, "--tensor-model-parallel-size", "4", "--sequence-parallel"), ARCH, layout)
    assert got.lines["activations"] == pytest.approx(expected[recompute] / 4)
    # TP without sequence parallelism: sbh(10 + 24/t + 5as/(ht)) per layer
    if recompute is None:
        got = P.plan(cfg_for(*flags, "--tensor-model-parallel-size", "4"), ARCH, layout).lines["activations"]
        assert got == pytest.approx(L * s * b * H * (10 + 24 / 4 + 5 * A * s / (H * 4)))
    # Flash attention (Transformer Engine) stores no attention scores: the 5as/h term goes
    flash = P.plan(cfg_for(*flash_flags), ARCH, layout)
    assert flash.lines["activations"] == pytest.approx(
        {None: L * 34 * s * b * H, "selective": L * 34 * s * b * H, "full": L * 2 * s * b * H + 34 * s * b * H}[recompute])


def test_pipeline_keeps_p_micro_batches_in_flight():
    layout = P.Layout(nodes=1, gpus_per_node=8, gpu_memory=141 * GiB)
    one = P.plan(cfg_for("--transformer-impl", "local"), ARCH, layout).lines["activations"]
    two = P.plan(cfg_for("--transformer-impl", "local", "--pipeline-model-parallel-size", "2"), ARCH, layout)
    assert two.lines["activations"] == pytest.approx(one)  # p micro-batches of L/p layers = L layers
    inter = P.plan(cfg_for("--transformer-impl", "local", "--pipeline-model-parallel-size", "2",
                           "--num-layers-per-virtual-pipeline-stage", "4"), ARCH, layout)
    assert inter.lines["activations"] == pytest.approx(one * (1 + 1 / (2 * 4)))  # v = 16 / 4 chunks


def test_logits_kv_cache_and_phases_by_hand():
    layout = P.Layout(nodes=1, gpus_per_node=8, gpu_memory=80 * GiB, reserve=4 * GiB)
    cfg = cfg_for("--tensor-model-parallel-size", "2", "--micro-batch-size", "4", "--gpu-memory-utilization", "0.5",
                  "--rollout-tensor-parallel-size", "2", "--use-distributed-optimizer")
    plan = P.plan(cfg, ARCH, layout)
    logits = 4 * 2048 * (V / 2) * 4  # b x s x V/t x fp32 = 500 MiB
    # two fp32 chunk buffers, each min(32 MiB, logits / 16) = 31.25 MiB here
    assert plan.lines["logits"] == pytest.approx(logits + 2 * logits / 16) == 562.5 * 2**20
    kv_per_token = 2 * L * (32 / 2) * 128 * 2  # K and V, 16 heads per rollout rank, head_dim 128, bf16
    assert plan.notes["kv_per_token"] == str(int(kv_per_token)) == "262144"
    assert plan.lines["vllm_weights"] == TOTAL * 2 / 2
    assert plan.kv_tokens == pytest.approx(plan.lines["vllm_kv_cache"] / kv_per_token)
    state = plan.lines["weights"] + plan.lines["gradients"] + plan.lines["optimizer"]
    assert plan.train_peak == pytest.approx(state + plan.lines["activations"] + plan.lines["logits"] + 4 * GiB)
    assert plan.rollout_peak == pytest.approx(state + 40 * GiB + 2 * V * H * 2 + 4 * GiB)
    assert plan.fits and plan.max_model_len == 2048  # prompt + response: what the job asks vLLM for


def test_checkpoint_save_row_by_hand():
    """Issue 24, item 2. The save runs while vLLM sleeps; megatron-core's memory-efficient fully_reshardable path
    (DistributedOptimizer.get_parameter_state_dp_zero with use_gloo_comm=True, return_on_all_ranks=False) allocates
    no device buffer. On the host, DP rank 0 of each model-parallel group holds fp32 param + exp_avg + exp_avg_sq
    of its shard (12 B/param) plus, per state key, the gather's receive list and its concatenation with the previous
    key's pair still referenced (3 x 4 B/param, the one bucket is the whole buffer); every DP rank copies its own
    shards first (12 B/param / DP). 2 nodes x 8 GPUs, TP 1, DP 16 (the dense 7B, bf16, distributed optimizer)."""
    layout = P.Layout(nodes=2, gpus_per_node=8, gpu_memory=141 * GiB)
    plan = P.plan(cfg_for("--tensor-model-parallel-size", "1", "--use-distributed-optimizer"), ARCH, layout)
    state = (2 + 4 + 12 / 16) * TOTAL  # bf16 weights, fp32 grads, fp32 master + Adam m, v over DP 16
    assert plan.save_peak == pytest.approx(state + 6 * GiB)  # model state + reserve: no save buffer on the device
    writer = 12 * TOTAL + 12 * TOTAL + 12 * TOTAL / 16  # world tensors + 3 buffers in flight + own shards
    other = 12 * TOTAL / 16
    assert plan.lines["save_host_writer"] == pytest.approx(writer) and plan.lines["save_host_other"] == pytest.approx(other)
    # rank order tp-cp-dp-pp: at TP 1 the only DP-rank-0 rank is rank 0, on node 0
    assert plan.host["save"] == pytest.approx(writer + 7 * other)
    assert plan.host["save"] == pytest.approx(30 * TOTAL)  # 24 + 8 x 12/16 B/param: 188.3 GiB on node 0
    assert plan.host["save"] / GiB == pytest.approx(188.27, abs=0.01)
    assert plan.host["train"] == 0  # level-2 sleep: vLLM keeps no host copy of its weights
    assert plan.host["rollout"] == 0  # nothing offloaded unless --offload-train-during-rollout

    # TP 8 on 16 GPUs: DP 2, the DP-rank-0 ranks 0-7 fill node 0
    plan = P.plan(cfg_for("--tensor-model-parallel-size", "8", "--use-distributed-optimizer"), ARCH, layout)
    per_gpu = L * ((4 * H * H + 3 * H * FFN) / 8 + 2 * H) + 2 * P.padded_vocab(V, 128, 8) * H / 8 + H
    writer = 12 * per_gpu + 12 * per_gpu + 12 * per_gpu / 2
    assert plan.host["save"] == pytest.approx(8 * writer)
    small = P.plan(cfg_for("--tensor-model-parallel-size", "8", "--use-distributed-optimizer"), ARCH,
                   P.Layout(nodes=2, gpus_per_node=8, gpu_memory=141 * GiB, host_memory=8 * writer - GiB))
    assert small.problems == [f"checkpoint save phase needs {8 * writer / GiB:.0f} GiB of host memory on one node > "
                              f"{(8 * writer - GiB) / GiB:.0f} GiB"]
    # TP 4 x PP 2: DP 2; writers are ranks 0-3 (stage 0) and 8-11 (stage 1): 4 per node, 4 others
    plan = P.plan(cfg_for("--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "2",
                          "--use-distributed-optimizer"), ARCH, layout)
    assert P.writer_ranks_per_node(4, 1, 2, 2, 8) == [4, 4]
    assert plan.host["save"] == pytest.approx(4 * plan.lines["save_host_writer"] + 4 * plan.lines["save_host_other"])
    # Without the distributed optimizer the main replica stages its fp32 master params and Adam moments: 12 B/param
    plan = P.plan(cfg_for("--tensor-model-parallel-size", "1"), ARCH, layout)
    assert plan.lines["save_host_writer"] == 12 * TOTAL and plan.lines["save_host_other"] == 0


def test_offload_during_rollout_moves_grads_and_optimizer_to_the_host():
    """--offload-train-during-rollout: while vLLM generates, the fp32 grads (4 B/param) and the sharded optimizer
    (12 B/param / DP) wait on the host; the rollout phase holds the bf16 weights only, so the largest
    gpu_memory_utilization that fits (and the KV cache it buys) grows."""
    layout = P.Layout(nodes=1, gpus_per_node=8, gpu_memory=141 * GiB)
    cfg = cfg_for("--tensor-model-parallel-size", "1", "--use-distributed-optimizer", "--gpu-memory-utilization", "0.5")
    off = P.plan(cfg, ARCH, layout)
    cfg.training.offload_train_during_rollout = True
    on = P.plan(cfg, ARCH, layout)
    moved = (4 + 12 / 8) * TOTAL  # DP 8
    assert on.lines["offloaded"] == pytest.approx(moved) and "offloaded" not in off.lines
    assert off.rollout_peak - on.rollout_peak == pytest.approx(moved)
    assert on.rollout_peak == pytest.approx(2 * TOTAL + 0.5 * 141 * GiB + 2 * V * H * 2 + 6 * GiB)
    assert on.train_peak == off.train_peak and on.save_peak == off.save_peak  # restored before training
    assert on.host["rollout"] == pytest.approx(8 * moved) and off.host["rollout"] == 0
    # largest utilization: floor((141 GiB - resident - refit - reserve) / 141 GiB, 2 digits)
    refit, reserve = 2 * V * H * 2, 6 * GiB
    assert off.max_utilization == math.floor((141 * GiB - 7.5 * TOTAL - refit - reserve) / (141 * GiB) * 100) / 100
    assert on.max_utilization == math.floor((141 * GiB - 2 * TOTAL - refit - reserve) / (141 * GiB) * 100) / 100
    assert (off.max_utilization, on.max_utilization) == (0.62, 0.86)  # (141 - 47.1 - 0.5 - 6) / 141; 12.6 GiB resident
    assert on.max_kv_tokens > off.max_kv_tokens


def test_memory_sizes_parse():
    assert P.parse_memory("141GiB") == 141 * GiB == P.parse_memory("141G")
    assert P.parse_memory("80GB") == 80e9 and P.parse_memory("1.5TiB") == 1.5 * 2**40
    with pytest.raises(ValueError, match="not understood"):
        P.parse_memory("lots")


PAPER_CONFIGS = sorted(REPO.glob("configs/*_a3po.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_config_fits_16_h200(path, capsys):
    code = a3po(["plan", "--config", str(path), "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "141GiB",
                 "--host-memory", "2TB"])  # a DGX H200 node: 2 TB of host memory
    out = capsys.readouterr().out
    assert code == 0 and "FITS:" in out, out
    assert "known architecture of" in out and "vLLM budget" in out and "KV cache" in out
    assert "peak, checkpoint save" in out and "host memory per node" in out and "  checkpoint save (" in out


def test_over_budget_names_the_knob_that_fits(capsys):
    path = REPO / "configs/qwen3-8b-base_a3po.yaml"
    code = a3po(["plan", "--config", str(path), "--nodes", "2", "--gpu-memory-utilization", "0.9"])
    out = capsys.readouterr().out
    assert code == 1 and "DOES NOT FIT: rollout phase needs" in out and "on top of the weights (grads + optimizer" in out
    assert "try --gpu-memory-utilization 0.88:" in out and "-> fits" in out  # grads + optimizer offloaded
    code = a3po(["plan", "--config", str(path), "--nodes", "2", "--gpu-memory-utilization", "0.9",
                 "--no-offload-train-during-rollout"])
    out = capsys.readouterr().out  # the model state stays on the device through the rollout
    assert code == 1 and "try --gpu-memory-utilization 0.73:" in out
    # offloading frees the 21.0 GiB of grads + optimizer per GPU for the rollout (163.8 -> 142.8 GiB)
    assert "rollout phase needs 163.8 GiB" in out and "try --offload-train-during-rollout: training 50.4 GiB, rollout 142.8" in out
    code = a3po(["plan", "--config", str(path), "--nodes", "2", "--recompute-granularity", "selective",
                 "--max-tokens-per-gpu", "0", "--micro-batch-size", "16", "--no-use-distributed-optimizer"])
    out = capsys.readouterr().out  # padded micro-batches (packing off)
    assert code == 1 and "DOES NOT FIT: training phase needs" in out and "try --micro-batch-size 8" in out
    code = a3po(["plan", "--config", str(path), "--nodes", "2", "--recompute-granularity", "selective",
                 "--max-tokens-per-gpu", "163840", "--no-use-distributed-optimizer"])
    out = capsys.readouterr().out  # packed: the token budget is the knob
    assert code == 1 and "DOES NOT FIT: training phase needs" in out and "try --max-tokens-per-gpu 81920" in out


def test_architecture_from_config_json_and_clear_errors(tmp_path, capsys):
    model = tmp_path / "my-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    args = ["plan", "--config", str(REPO / "configs/qwen3-8b-base_a3po.yaml"), "--nodes", "2", "--hf-path", str(model)]
    assert a3po(args) == 0
    out = capsys.readouterr().out
    assert f"{model}/config.json" in out and "6.74B params" in out
    assert a3po(args[:-1] + [str(tmp_path / "unknown-model")]) == 2
    assert "no architecture for --hf-path" in capsys.readouterr().err
    assert a3po(args + ["--tensor-model-parallel-size", "3"]) == 2
    assert "--tensor-model-parallel-size 3 must divide the model's 32 attention heads" in capsys.readouterr().err
