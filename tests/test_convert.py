"""a3po-convert end to end on each family's tiny random model, against independent references.

- HF -> Megatron -> HF gives bitwise identical tensors (read back with the `safetensors` package) and the same
  config.json, for llama / qwen2 (tied, qkv bias) / qwen3 (qk-norm), in fp32 and bf16.
- `verify` (HF transformers logits vs Megatron) passes at TP=1, TP=2 and PP=2 (2 gloo ranks), with the TP=2
  and PP=2 runs loading checkpoints converted at TP=1; a checkpoint saved at TP=2 exports at PP=2.
- The plain command starts its own ranks (TP=2, no torchrun); inside a rank job it runs like under torchrun.
- The live-model generator (hf_mapping.iter_hf_tensors via PolicyModel.hf_state) at TP=2 reproduces the HF
  state dict exactly.
To keep process start-up (the expensive part on 2 cores) low, each rank job runs several commands in-process.
"""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_a3po.spawn import run_in_ranks

CASES = {"llama": ("llama", "float32"), "qwen2": ("qwen2", "float32"), "qwen3": ("qwen3", "float32"),
         "qwen3_bf16": ("qwen3", "bfloat16")}
FAMILIES = ["llama", "qwen2", "qwen3"]
# The 2-rank conversions (hf-to-megatron, verify, megatron-to-hf at TP=2 / PP=2) run under CUDA emulation: the
# GPU's device and NCCL rules hold, as on the cluster where users convert.
EMULATED = {"A3PO_EMULATE_CUDA": "1"}
DIFF = re.compile(r"max abs logit diff (\S+)\s+mean abs logit diff (\S+)")


def _cli(argv):
    """Run a3po-convert in this process; (exit code, stdout, stderr)."""
    from checkpoints_tools.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--no-progress"])
    return rc, out.getvalue(), err.getvalue()


def _one_rank_job(root: str):
    """TP=1 (a 1-rank job, the torchrun path): convert, export, verify every case; sharded export; bad meta."""
    results = {}
    for case in CASES:
        hf, mg, back = f"{root}/hf_{case}", f"{root}/mg_{case}", f"{root}/back_{case}"
        results[case] = {
            "h2m": _cli(["hf-to-megatron", "--hf-path", hf, "--output", mg]),
            "m2h": _cli(["megatron-to-hf", "--megatron-path", mg, "--output", back]),
            "verify": _cli(["verify", "--hf-path", hf, "--megatron-path", mg]),
        }
    # Small shards (several files + index), then back into Megatron from the sharded HF dir and out again.
    results["sharded"] = [
        _cli(["megatron-to-hf", "--megatron-path", f"{root}/mg_qwen2", "--output", f"{root}/sharded",
              "--max-shard-size", "2MB"]),
        _cli(["hf-to-megatron", "--hf-path", f"{root}/sharded", "--output", f"{root}/mg_sharded"]),
        _cli(["megatron-to-hf", "--megatron-path", f"{root}/mg_sharded", "--output", f"{root}/back_sharded"]),
    ]
    results["too_strict"] = _cli(["verify", "--hf-path", f"{root}/hf_llama", "--megatron-path", f"{root}/mg_llama",
                                  "--tolerance", "1e-12"])
    results["to_bf16"] = _cli(["megatron-to-hf", "--megatron-path", f"{root}/mg_qwen2", "--output", f"{root}/bf16",
                               "--dtype", "bf16"])
    # Metadata consistent with itself but not with the stored tensors (ffn size changed in both places).
    import shutil

    shutil.copytree(f"{root}/mg_llama", f"{root}/mg_bad")
    meta_path = f"{root}/mg_bad/a3po_metadata.json"
    meta = json.load(open(meta_path))
    meta["arch"]["ffn_hidden_size"] = meta["hf_config"]["intermediate_size"] = 384
    json.dump(meta, open(meta_path, "w"))
    results["bad_meta"] = _cli(["megatron-to-hf", "--megatron-path", f"{root}/mg_bad", "--output", f"{root}/x"])
    return results


def _two_rank_job(root: str):
    """2 ranks: verify TP=2 and PP=2 on the TP=1 checkpoints; TP=2-saved checkpoint exported at PP=2;
    the live generator at TP=2."""
    from megatron_a3po import parallel

    results = {}
    for fam in FAMILIES:
        for label, flag in (("tp2", "--tensor-model-parallel-size"), ("pp2", "--pipeline-model-parallel-size")):
            results[f"{fam}_{label}"] = _cli(["verify", "--hf-path", f"{root}/hf_{fam}", "--megatron-path",
                                              f"{root}/mg_{fam}", flag, "2"])
    results["pp2_export"] = _cli(["megatron-to-hf", "--megatron-path", f"{root}/mg_qwen3_tp2", "--output",
                                  f"{root}/back_qwen3_tp2_pp2", "--pipeline-model-parallel-size", "2"])
    results["tp2_export"] = _cli(["megatron-to-hf", "--megatron-path", f"{root}/mg_qwen3_tp2", "--output",
                                  f"{root}/back_qwen3_tp2_tp2", "--tensor-model-parallel-size", "2"])
    results["live"] = {fam: _live_state(f"{root}/hf_{fam}") for fam in ("qwen2", "llama")}
    return results if parallel.rank() == 0 else None


def _live_state(hf_dir):
    """What the vLLM refit does: stream (hf_name, full tensor) out of a TP=2 sharded, DDP-wrapped model."""
    from megatron_a3po import parallel
    from megatron_a3po.config import Config
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models.families import load_hf_arch

    arch, _ = load_hf_arch(hf_dir)
    cfg = Config()
    cfg.parallel.tensor_model_parallel_size = 2  # vocab 128 padded to 256 rows: padding must not leak out
    parallel.init_model_parallel(parallel.ParallelSizes(tensor=2))
    model = PolicyModel(cfg, arch, with_optimizer=False)
    model.load_hf(hf_dir)
    assert model.padded_vocab == 256
    return [(name, t.clone()) for name, t in model.hf_state()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("convert")
    for case, (family, dtype) in CASES.items():
        write_tiny_hf_checkpoint(root / f"hf_{case}", family, seed=11, dtype=dtype)
    return root


@pytest.fixture(scope="module")
def tp1(root):
    (results,) = run_in_ranks(_one_rank_job, 1, (str(root),), timeout=600)
    return results


@pytest.fixture(scope="module")
def spawned_tp2(root):
    """The plain command (not under torchrun) starting its own 2 ranks, under CUDA emulation."""
    cmd = [sys.executable, "-m", "checkpoints_tools.convert", "hf-to-megatron", "--hf-path", str(root / "hf_qwen3"),
           "--output", str(root / "mg_qwen3_tp2"), "--tensor-model-parallel-size", "2", "--no-progress"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(EMULATED)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def tp2_pp2(root, tp1, spawned_tp2):
    return run_in_ranks(_two_rank_job, 2, (str(root),), timeout=900, env=EMULATED)[0]


def _assert_same_tensors(reference_dir, candidate_dir):
    def load_dir(d):
        tensors = {}
        for f in sorted(d.glob("*.safetensors")):
            tensors.update(load_file(f))
        return tensors

    ref, got = load_dir(reference_dir), load_dir(candidate_dir)
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), f"{name} differs bitwise"


def _diffs(stdout):
    match = DIFF.search(stdout)
    assert match, stdout
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bitwise_identical(root, tp1, case):
    for step in ("h2m", "m2h"):
        rc, out, err = tp1[case][step]
        assert rc == 0, err
        assert "peak RSS" in out
    _assert_same_tensors(root / f"hf_{case}", root / f"back_{case}")
    assert json.loads((root / f"back_{case}/config.json").read_text()) == \
        json.loads((root / f"hf_{case}/config.json").read_text())
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (root / f"back_{case}" / side).read_bytes() == (root / f"hf_{case}" / side).read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_verify_tp1(tp1, case):
    rc, out, err = tp1[case]["verify"]
    assert rc == 0, err
    max_diff, _ = _diffs(out)
    assert max_diff <= 1e-4 and "PASS" in out and "first 128 vocab columns" in out


def test_verify_exits_nonzero_above_tolerance(tp1):
    rc, out, _ = tp1["too_strict"]
    assert rc == 3 and "FAIL" in out


def test_sharded_export_loads_in_transformers(root, tp1):
    for rc, _, err in tp1["sharded"]:
        assert rc == 0, err
    index = json.loads((root / "sharded/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_tensors(root / "hf_qwen2", root / "sharded")
    _assert_same_tensors(root / "hf_qwen2", root / "back_sharded")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "sharded", dtype=torch.float32)
    ref = load_file(root / "hf_qwen2/model.safetensors")
    for name, param in model.state_dict().items():
        if name != "lm_head.weight":  # tied: HF materialises it from the embedding
            assert torch.equal(param, ref[name]), name


def test_export_in_another_dtype(root, tp1):
    rc, _, err = tp1["to_bf16"]
    assert rc == 0, err
    assert json.loads((root / "bf16/config.json").read_text())["dtype"] == "bfloat16"
    ref, got = load_file(root / "hf_qwen2/model.safetensors"), load_file(root / "bf16/model.safetensors")
    assert sorted(ref) == sorted(got)
    for name, t in ref.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name


def test_checkpoint_contradicting_its_metadata_is_refused(root, tp1):
    rc, _, err = tp1["bad_meta"]
    assert rc == 2
    assert "do not fit the model described by a3po_metadata.json" in err
    assert not (root / "x").exists() and not list(root.glob(".x.*"))


def test_plain_command_starts_its_own_ranks(spawned_tp2, root):
    assert spawned_tp2.returncode == 0, spawned_tp2.stderr[-3000:]
    assert "TP=2" in spawned_tp2.stdout and "peak RSS" in spawned_tp2.stdout
    meta = json.loads((root / "mg_qwen3_tp2/a3po_metadata.json").read_text())
    assert meta["saved_tensor_parallel_size"] == 2 and meta["padded_vocab_size"] == 256


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_verify_tp2_pp2_on_tp1_checkpoints(tp2_pp2, family, layout):
    rc, out, err = tp2_pp2[f"{family}_{layout}"]
    assert rc == 0, err
    max_diff, mean_diff = _diffs(out)
    assert max_diff <= 1e-4 and mean_diff <= max_diff and "PASS" in out


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_tp2_saved_checkpoint_exports_at_pp2_and_tp2(root, tp2_pp2, layout):
    rc, _, err = tp2_pp2[f"{layout}_export"]
    assert rc == 0, err
    _assert_same_tensors(root / "hf_qwen3", root / f"back_qwen3_tp2_{layout}")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_live_generator_at_tp2_reproduces_hf_state(root, tp2_pp2, family):
    streamed = tp2_pp2["live"][family]
    ref = load_file(root / f"hf_{family}/model.safetensors")
    assert [n for n, _ in streamed] == [n for n, _ in streamed if n in ref] and len(streamed) == len(ref)
    for name, tensor in streamed:
        assert tensor.dtype == ref[name].dtype and torch.equal(tensor, ref[name]), name
