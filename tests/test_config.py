"""Config: YAML + Megatron-named flags, and validation that names the offending flag before any process group."""

import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_a3po import config as C
from megatron_a3po.models import builder, families, tiny


def _arch(family="qwen2", **overrides):
    return families.arch_from_hf_config(tiny.hf_config(family, **overrides).to_dict())


def _cfg(*flags):
    cfg, _ = C.parse_args(["--tiny-model", "qwen2", *flags])
    return cfg


INVALID = [
    # (flags, world size, text the message must contain)
    (["--tensor-model-parallel-size", "3"], 3, "--tensor-model-parallel-size 3 must divide the model's 4 attention heads"),
    (["--tensor-model-parallel-size", "4"], 4, "--tensor-model-parallel-size 4 must divide the model's 2 query groups"),
    (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size 3 must divide the model's 4 layers"),
    (["--tensor-model-parallel-size", "2"], 3, "not divisible by --tensor-model-parallel-size (2)"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6 must be divisible by --micro-batch-size"),
    (["--global-batch-size", "4", "--micro-batch-size", "1"], 8, "--global-batch-size 4 must be divisible"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are mutually exclusive"),
    (["--fp8-format", "e4m3", "--bf16"], 1, "--fp8-format needs Transformer Engine and a CUDA GPU"),
    (["--fp8-format", "e5m2"], 1, "--fp8-format must be e4m3 or hybrid"),
    (["--micro-batch-size", "0"], 1, "--micro-batch-size must be >= 1"),
    (["--min-lr", "1e-3", "--lr", "1e-6"], 1, "--min-lr"),
    (["--save-interval", "10"], 1, "--save-interval needs --save DIR"),
    (["--load", "/nonexistent/ckpt"], 1, "--load /nonexistent/ckpt: path does not exist"),
    (["--recompute-granularity", "partial"], 1, "--recompute-granularity must be full or selective"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers-per-virtual-pipeline-stage 3 must divide the 2 layers per pipeline stage"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
]


@pytest.mark.parametrize("flags,world,message", INVALID, ids=[" ".join(f) for f, _, _ in INVALID])
def test_invalid_configuration_names_the_flag(flags, world, message):
    with pytest.raises(C.ConfigError) as err:
        C.validate(_cfg(*flags), world_size=world, arch=_arch())
    assert message in str(err.value)


def test_model_source_must_be_given_once(tmp_path):
    cfg, _ = C.parse_args([])
    with pytest.raises(C.ConfigError, match="exactly one model source"):
        C.validate(cfg, world_size=1)
    cfg, _ = C.parse_args(["--hf-path", str(tmp_path)])
    with pytest.raises(C.ConfigError, match="--hf-path .*no config.json"):
        C.validate(cfg, world_size=1)


def test_valid_layouts_pass():
    C.validate(_cfg("--tensor-model-parallel-size", "2"), world_size=2, arch=_arch())
    C.validate(_cfg("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                    "--global-batch-size", "8"), world_size=4, arch=_arch())
    C.validate(_cfg("--tensor-model-parallel-size", "2", "--sequence-parallel"), world_size=2, arch=_arch())


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  tensor_model_parallel_size: 2\nmodel:\n  tiny_model: llama\n"
                    "training:\n  lr: 3.0e-6\n  global-batch-size: 16\n")
    cfg, _ = C.parse_args(["--config", str(path), "--lr", "1e-5", "--no-sequence-parallel"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.tiny_model == "llama"
    assert cfg.training.lr == 1e-5 and cfg.training.global_batch_size == 16
    assert cfg.parallel.sequence_parallel is False


@pytest.mark.parametrize("text,message", [
    ("parallel:\n  tensor_parallel: 2\n", "unknown key parallel.tensor_parallel"),
    ("paralel:\n  tensor_model_parallel_size: 2\n", "unknown section 'paralel'"),
    ("training:\n  micro_batch_size: two\n", "'two' is not a valid int"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_yaml_is_refused_with_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError, match=message):
        C.parse_args(["--config", str(path)])


def test_bad_config_exits_nonzero_before_any_process_group():
    """A 2-rank torchrun job with an impossible TP exits quickly with the message (no hanging rendezvous)."""
    start = time.monotonic()
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc-per-node", "2",
         "-m", "megatron_a3po.train", "--tiny-model", "qwen2", "--tensor-model-parallel-size", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "--tensor-model-parallel-size (3)" in proc.stderr
    assert time.monotonic() - start < 120


def test_fp8_and_recompute_translate_into_transformer_config():
    cfg = builder.transformer_config(_arch("qwen3"), tp=2, params_dtype=torch.bfloat16, fp8_format="hybrid",
                                     fp8_recipe="blockwise", recompute_granularity="full", use_te=True,
                                     sequence_parallel=True)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.bf16, cfg.params_dtype) == ("hybrid", "blockwise", True, torch.bfloat16)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)
    assert cfg.qk_layernorm and cfg.kv_channels == 64 and cfg.sequence_parallel
    plain = builder.transformer_config(_arch("qwen2"))
    assert plain.fp8 is None and plain.add_qkv_bias and not plain.qk_layernorm and plain.params_dtype == torch.float32


def test_layer_spec_selection_on_this_machine():
    """No CUDA here: auto picks the local spec, an explicit TE request is refused with the reason."""
    from megatron.core.transformer.identity_op import IdentityOp

    assert builder.use_transformer_engine("auto") is torch.cuda.is_available()
    assert builder.use_transformer_engine("local") is False
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs Transformer Engine and CUDA"):
            builder.use_transformer_engine("transformer_engine")
    spec = builder.layer_spec(_arch("qwen3"), use_te=False)
    attn = spec.submodules.self_attention.submodules
    assert attn.q_layernorm is not IdentityOp and attn.k_layernorm is not IdentityOp
    assert builder.layer_spec(_arch("qwen2"), use_te=False).submodules.self_attention.submodules.q_layernorm is IdentityOp


def test_vocab_padding():
    assert families.padded_vocab_size(151936, 128, 1) == 151936
    assert families.padded_vocab_size(151936, 128, 2) == 152064
    assert families.padded_vocab_size(100, 64, 2) == 128
