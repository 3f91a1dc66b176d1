"""Checkpoints move between the Transformer Engine layer spec (GPU) and the local spec (CPU, a3po-convert).

Both specs store the same weight keys (the local spec's `sharded_state_dict_keys_map` renames input_layernorm /
pre_mlp_layernorm to TE's fused linear_qkv / linear_fc1 `layer_norm_weight`), and the linear layers of both emit
`<linear>._extra_state`. What differs: TE's norms (te.pytorch.RMSNorm, a TE "op" with get_extra_state) emit
`_extra_state` for decoder.final_layernorm and q/k_layernorm, the local norms none. TE is not installed here, so
`TEStyleRMSNorm` below gives the local norm TE's extra state and the model the TE spec's set of keys; then:
(a) a3po-convert's output (no norm extra state) loads into it (GPU `--load` of a converted checkpoint);
(b) a checkpoint saved from it loads into the local spec and exports with `a3po-convert megatron-to-hf`
    bitwise equal to the HF source (a GPU checkpoint converted / verified on a CPU box);
(c) any other missing or unexpected key is still refused;
(d) extra state stored in a checkpoint is restored into a model that has it (FP8 scales survive a resume).
One 1-rank job runs them all.
"""

import contextlib
import io
import json
import os
import pickle
import shutil

import pytest
import torch

from megatron_a3po.models.local_norm import LocalRMSNorm
from megatron_a3po.spawn import run_in_ranks

FAMILY = "qwen3"  # qk-norm: q_layernorm / k_layernorm carry extra state under TE too


class TEStyleRMSNorm(LocalRMSNorm):
    """LocalRMSNorm with the extra state of TE's RMSNorm (transformer_engine/pytorch/ops/op.py,
    BasicOperation.get_extra_state / set_extra_state): a uint8 tensor holding pickled FP8 recipe state, empty
    without FP8. It has no sharded_state_dict, so megatron-core (transformer/utils.py sharded_state_dict_default ->
    make_sharded_tensors_for_checkpoint) wraps `_extra_state` in a ShardedObject, exactly as for TENorm."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.empty(0, dtype=torch.uint8)

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def _te_like_block_spec(original):
    """The local block spec with TE's norm extra state on the final norm and q/k norms (where TE uses TENorm)."""
    import dataclasses

    def block_spec(arch, config, use_te, vp_stage):
        block = original(arch, config, use_te, vp_stage)
        layer = block.layer_specs[0]
        attn = layer.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(
            attn.submodules, q_layernorm=TEStyleRMSNorm, k_layernorm=TEStyleRMSNorm))
        layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attn))
        return dataclasses.replace(block, layer_specs=[layer] * len(block.layer_specs), layer_norm=TEStyleRMSNorm)

    return block_spec


def _cli(argv):
    from checkpoints_tools.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--no-progress"])
    return rc, out.getvalue(), err.getvalue()


def _attempt(fn):
    """(None, result) or (error text, None): each case reports its own outcome."""
    try:
        return None, fn()
    except Exception as err:  # noqa: BLE001 - the test asserts on the text
        return f"{type(err).__name__}: {err}", None


def _job(root: str):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_a3po import parallel
    from megatron_a3po.models import builder, megatron_ckpt

    res = {"convert": _cli(["hf-to-megatron", "--hf-path", f"{root}/hf", "--output", f"{root}/converted"])}
    meta = megatron_ckpt.read_meta(f"{root}/converted")
    arch = meta.arch
    parallel.init_model_parallel(parallel.ParallelSizes())

    def local():
        return builder.build_model(arch, padded_vocab=meta.padded_vocab_size, use_te=False)[1]

    def te_like():
        original = builder.block_spec
        builder.block_spec = _te_like_block_spec(original)
        try:
            return builder.build_model(arch, padded_vocab=meta.padded_vocab_size, use_te=False)[1]
        finally:
            builder.block_spec = original

    def norms(chunks):
        return [m for m in chunks[0].modules() if isinstance(m, TEStyleRMSNorm)]

    def weights(chunks):
        return {k: v.clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}

    def sharded_keys(chunks):
        return {v.key for v in megatron_ckpt.sharded_state_dict(chunks).values()}

    res["extra_keys"] = sorted(sharded_keys(te_like()) - sharded_keys(local()))
    res["missing_keys"] = sorted(sharded_keys(local()) - sharded_keys(te_like()))

    # (a) the converter's output into the TE-like model: the same weights as the local model loads.
    reference = local()
    megatron_ckpt.load_model(reference, f"{root}/converted", arch)
    te = te_like()
    res["a"] = _attempt(lambda: megatron_ckpt.load_model(te, f"{root}/converted", arch))
    got, want = weights(te), weights(reference)
    res["a_same_weights"] = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    # (d) + (b): a TE-like checkpoint with FP8-like extra state; back into a TE-like model, into the local spec,
    # and out to HF. Its a3po_metadata.json and hf/ are the converted checkpoint's (as a training save writes them).
    payload = torch.frombuffer(bytearray(pickle.dumps({"recipe": "delayed", "amax_history_fwd": [1.5, 2.0]})),
                               dtype=torch.uint8)
    for norm in norms(te):
        norm.extra = payload.clone()
    gpu_dir = f"{root}/te_saved"
    os.makedirs(gpu_dir)
    megatron_ckpt.save_model(te, gpu_dir)
    shutil.copy(f"{root}/converted/{megatron_ckpt.METADATA_FILE}", gpu_dir)
    shutil.copytree(f"{root}/converted/{megatron_ckpt.HF_FILES_DIR}", f"{gpu_dir}/{megatron_ckpt.HF_FILES_DIR}")
    again = te_like()
    res["d"] = _attempt(lambda: megatron_ckpt.load_model(again, gpu_dir, arch))
    res["d_restored"] = [torch.equal(n.extra, payload) for n in norms(again)]
    plain = local()
    res["b"] = _attempt(lambda: megatron_ckpt.load_model(plain, gpu_dir, arch))
    got = weights(plain)
    res["b_same_weights"] = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    res["b_export"] = _cli(["megatron-to-hf", "--megatron-path", gpu_dir, "--output", f"{root}/back"])

    # (c) anything but `_extra_state` still has to match: a weight missing, a stray tensor, a stray object whose
    # name only looks like extra state.
    def save_altered(name, alter):
        state = megatron_ckpt.sharded_state_dict(reference)
        alter(state)
        path = f"{root}/{name}"
        os.makedirs(path)
        with megatron_ckpt._in_process_write_results():
            dist_checkpointing.save(state, path)
        return path

    stray = torch.zeros(3)
    cases = {
        "weight_missing": lambda s: s.pop("decoder.final_layernorm.weight"),
        "stray_tensor": lambda s: s.update(
            {"stray": ShardedTensor.from_rank_offsets("decoder.stray.weight", stray, replica_id=0)}),
        "stray_object": lambda s: s.update(
            {"stray": ShardedObject("decoder.final_layernorm_extra_state", None, (1,), (0,), replica_id=0)}),
    }
    res["c"] = {name: _attempt(lambda p=save_altered(name, alter): megatron_ckpt.load_model(local(), p, arch))
                for name, alter in cases.items()}
    return res


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("extra_state")
    write_tiny_hf_checkpoint(root / "hf", FAMILY, seed=5, num_hidden_layers=2)
    return root


@pytest.fixture(scope="module")
def results(root):
    (res,) = run_in_ranks(_job, 1, (str(root),), timeout=300)
    assert res["convert"][0] == 0, res["convert"][2]
    return res


def test_the_te_like_model_has_the_te_specs_extra_keys(results):
    # exactly the keys TE's norms add (layers are stacked under one key: decoder.layers.<...>)
    assert results["extra_keys"] == ["decoder.final_layernorm._extra_state",
                                     "decoder.layers.self_attention.k_layernorm._extra_state",
                                     "decoder.layers.self_attention.q_layernorm._extra_state"]
    assert results["missing_keys"] == []


def test_converted_checkpoint_loads_into_the_te_spec(results):
    error, _ = results["a"]
    assert error is None, error
    assert results["a_same_weights"]


def test_te_checkpoint_loads_into_the_local_spec_and_exports_to_hf(root, results):
    from safetensors.torch import load_file

    error, _ = results["b"]
    assert error is None, error
    assert results["b_same_weights"]
    rc, _, err = results["b_export"]
    assert rc == 0, err
    ref, got = load_file(root / "hf/model.safetensors"), load_file(root / "back/model.safetensors")
    assert sorted(ref) == sorted(got)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((root / "back/config.json").read_text())["num_hidden_layers"] == 2


def test_stored_extra_state_is_restored(results):
    error, _ = results["d"]
    assert error is None, error
    assert results["d_restored"] == [True] * 5  # final norm + (q, k) x 2 layers


@pytest.mark.parametrize("case, key", [("weight_missing", "decoder.final_layernorm.weight"),
                                       ("stray_tensor", "decoder.stray.weight"),
                                       ("stray_object", "decoder.final_layernorm_extra_state")])
def test_other_mismatches_are_still_refused(results, case, key):
    error, _ = results["c"][case]
    assert error is not None and error.startswith("MegatronCheckpointError"), error
    assert key in error
