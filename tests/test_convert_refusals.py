"""a3po-convert refuses every kind of bad input with a clear message, exit code 1 and nothing left behind.

These checks all run before any rank is started, so the tests call `main()` in this process (fast).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_tools.common import ConvertError, atomic_output_dir
from checkpoints_tools.convert import main
from megatron_a3po.models.families import load_hf_arch
from megatron_a3po.models.megatron_ckpt import METADATA_FILE, CheckpointMeta


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=3)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard_in_two(hf_dir):
    """Rewrite model.safetensors as two shards + index (plain safetensors calls, independent of the converter)."""
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, hf_dir / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return list(halves)


def _refused(capsys, argv, *phrases, code=2):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in error: {err}"
    return err


def _nothing_left(out):
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output was left behind"


def _h2m(hf, out, *extra):
    return ["hf-to-megatron", "--hf-path", str(hf), "--output", str(out), "--no-progress", *extra]


def test_unsupported_architecture_lists_supported(tmp_path, tiny_hf, capsys):
    hf = _copy(tiny_hf, tmp_path / "gpt2ish")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _refused(capsys, _h2m(hf, out), "unsupported architecture", "GPT2LMHeadModel", "LlamaForCausalLM",
             "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    _nothing_left(out)


def test_missing_shard(tmp_path, tiny_hf, capsys):
    hf = _copy(tiny_hf, tmp_path / "sharded")
    files = _shard_in_two(hf)
    (hf / files[1]).unlink()
    out = tmp_path / "out"
    _refused(capsys, _h2m(hf, out), files[1], "missing", "re-download")
    _nothing_left(out)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_shard(tmp_path, tiny_hf, capsys, cut):
    hf = _copy(tiny_hf, tmp_path / "truncated")
    files = _shard_in_two(hf)
    path = hf / files[0]
    data = path.read_bytes()
    path.write_bytes(data[:-1000] if cut == "data" else data[:100])
    out = tmp_path / "out"
    _refused(capsys, _h2m(hf, out), files[0], "truncated")
    _nothing_left(out)


def test_tensor_with_wrong_shape(tmp_path, tiny_hf, capsys):
    hf = _copy(tiny_hf, tmp_path / "reshaped")
    tensors = load_file(hf / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-8].clone()
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    _refused(capsys, _h2m(hf, out), name, "[504, 256]", "[512, 256]")
    _nothing_left(out)


def test_config_that_disagrees_with_weights(tmp_path, tiny_hf, capsys):
    hf = _copy(tiny_hf, tmp_path / "wrong_config")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (hf / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, _h2m(hf, tmp_path / "out"), "missing tensor", "model.layers.4.")
    _nothing_left(tmp_path / "out")


def test_unmapped_extra_tensor(tmp_path, tiny_hf, capsys):
    hf = _copy(tiny_hf, tmp_path / "extra")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(256)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    _refused(capsys, _h2m(hf, tmp_path / "out"), "unexpected tensor", "down_proj.bias", "silently drop")


def test_output_exists_needs_overwrite(tmp_path, tiny_hf, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _refused(capsys, _h2m(tiny_hf, out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    _refused(capsys, _h2m(tiny_hf, tiny_hf, "--overwrite"), "overlaps the input")


def test_parallel_sizes_must_fit_the_model(tmp_path, tiny_hf, capsys):
    _refused(capsys, _h2m(tiny_hf, tmp_path / "out", "--tensor-model-parallel-size", "3"),
             "--tensor-model-parallel-size 3 must divide", "attention heads")
    _refused(capsys, _h2m(tiny_hf, tmp_path / "out", "--pipeline-model-parallel-size", "3"),
             "--pipeline-model-parallel-size 3 must divide", "4 layers")
    _nothing_left(tmp_path / "out")


def test_torchrun_world_size_must_match(tmp_path, tiny_hf, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    _refused(capsys, _h2m(tiny_hf, tmp_path / "out", "--tensor-model-parallel-size", "2"),
             "WORLD_SIZE=4", "launch exactly 2 ranks")
    _nothing_left(tmp_path / "out")


def _fake_megatron_checkpoint(path, hf_dir, **arch_changes):
    """Only the metadata: every check below happens before the tensors are read."""
    import dataclasses

    arch, hf_config = load_hf_arch(hf_dir)
    path.mkdir()
    (path / "metadata.json").write_text("{}")
    (path / ".metadata").write_bytes(b"")
    meta = CheckpointMeta(arch=dataclasses.replace(arch, **arch_changes), hf_config=hf_config, dtype="float32",
                          padded_vocab_size=128, make_vocab_size_divisible_by=128)
    meta.write(path)
    return path


def test_verify_refuses_hf_config_metadata_mismatch(tmp_path, tiny_hf, capsys):
    other = _copy(tiny_hf, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=False)
    cfg["rope_parameters"] = dict(cfg.get("rope_parameters") or {}, rope_theta=1e6)
    (other / "config.json").write_text(json.dumps(cfg))
    ckpt = _fake_megatron_checkpoint(tmp_path / "mckpt", tiny_hf)
    err = _refused(capsys, ["verify", "--hf-path", str(other), "--megatron-path", str(ckpt)],
                   "describe different models", "num_attention_heads", "num_query_groups", "head_dim",
                   "rope_theta", "tie_word_embeddings")
    assert "hidden_size" not in err and "vocab_size" not in err


def test_megatron_metadata_that_contradicts_itself(tmp_path, tiny_hf, capsys):
    ckpt = _fake_megatron_checkpoint(tmp_path / "mckpt", tiny_hf, hidden_size=512, vocab_size=64)
    out = tmp_path / "out"
    _refused(capsys, ["megatron-to-hf", "--megatron-path", str(ckpt), "--output", str(out)],
             "contradicts itself", "hidden_size", "vocab_size")
    _nothing_left(out)


def test_not_a_converted_checkpoint(tmp_path, tiny_hf, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["megatron-to-hf", "--megatron-path", str(tiny_hf), "--output", str(out)],
             METADATA_FILE, "not a checkpoint written by `a3po-convert hf-to-megatron`")
    ckpt = _fake_megatron_checkpoint(tmp_path / "mckpt", tiny_hf)
    (ckpt / ".metadata").unlink()
    _refused(capsys, ["megatron-to-hf", "--megatron-path", str(ckpt), "--output", str(out)], "incomplete")
    _nothing_left(out)


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / METADATA_FILE).write_text("{}")
            raise KeyboardInterrupt
    _nothing_left(out)
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok"
    assert not list(tmp_path.glob(".out.*"))


def test_bad_dtype_and_usage():
    with pytest.raises(SystemExit) as exc:
        main(["hf-to-megatron", "--hf-path", "x", "--output", "y", "--dtype", "int8"])
    assert exc.value.code == 2
    with pytest.raises(ConvertError):
        from checkpoints_tools.common import dtype_flag

        dtype_flag("fp8")


def _refuse_in_rank():
    from megatron_a3po.models.megatron_ckpt import MegatronCheckpointError

    raise MegatronCheckpointError("/ckpt: the stored tensors do not fit")


def _fail_in_rank():
    return 1 / 0


def test_rank_errors_are_reported_as_one_line():
    """A user error inside a spawned rank reaches the parent as the same exception (the CLI prints its one line);
    a bug stays a RuntimeError carrying the rank's traceback."""
    from megatron_a3po.errors import UserError
    from megatron_a3po.models.megatron_ckpt import MegatronCheckpointError
    from megatron_a3po.spawn import run_in_ranks

    with pytest.raises(MegatronCheckpointError, match="^/ckpt: the stored tensors do not fit$") as err:
        run_in_ranks(_refuse_in_rank, 1)
    assert isinstance(err.value, UserError)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_in_ranks(_fail_in_rank, 1)
