"""Gradient-accumulation fusion without apex (issue 24, item 5).

On a GPU with Transformer Engine, builder.transformer_config used to set gradient_accumulation_fusion=True
unconditionally; megatron-core's ColumnParallelLinear (tensor_parallel/layers.py, __init__) then raises a
RuntimeError at model build when apex's `fused_weight_gradient_mlp_cuda` does not import, and GPTModel's output
layer is that class even with the TE spec. apex is not installed here, so this box shows both sides: megatron-core's
own constructor raising, and the builder's decision falling back with one warning.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import layers

from megatron_a3po.models import builder


def _output_layer(fusion: bool):
    """megatron-core's ColumnParallelLinear as GPTModel builds its output layer (no process group needed)."""
    config = ModelParallelConfig(gradient_accumulation_fusion=fusion, use_cpu_initialization=True,
                                 perform_initialization=False)
    return tensor_parallel.ColumnParallelLinear(16, 32, config=config, init_method=torch.nn.init.zeros_, bias=False)


def test_our_probe_agrees_with_megatron_core():
    assert builder.grad_accum_fusion_available() == layers._grad_accum_fusion_available


@pytest.mark.skipif(layers._grad_accum_fusion_available, reason="apex's extension is installed here")
def test_megatron_core_raises_without_apex_and_the_builder_falls_back(monkeypatch, capsys):
    # what the builder chose before the fix on a GPU with TE (on_gpu and use_te): megatron-core's own check raises
    with pytest.raises(RuntimeError, match="gradient_accumulation_fusion set to True but the custom CUDA extension "
                                           "fused_weight_gradient_mlp_cuda module is not found"):
        _output_layer(True)
    monkeypatch.setattr(builder, "_fusion_warned", [])
    chosen = [builder.gradient_accumulation_fusion(on_gpu=True, use_te=True) for _ in range(3)]
    assert chosen == [False] * 3
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err  # one warning per process, however many models are built
    assert "fused_weight_gradient_mlp_cuda" in err and "gradient accumulation fusion is off" in err
    assert "--cuda_ext" in err and "Docker image" in err
    assert _output_layer(chosen[0]).weight.shape == (32, 16)  # the fallback builds


def test_no_fusion_and_no_warning_off_gpu_or_without_te(monkeypatch, capsys):
    monkeypatch.setattr(builder, "_fusion_warned", [])
    assert not builder.gradient_accumulation_fusion(on_gpu=False, use_te=True)
    assert not builder.gradient_accumulation_fusion(on_gpu=True, use_te=False)
    assert capsys.readouterr().err == ""


def test_with_the_extension_fusion_stays_on(monkeypatch, capsys):
    monkeypatch.setattr(builder, "grad_accum_fusion_available", lambda: True)
    assert builder.gradient_accumulation_fusion(on_gpu=True, use_te=True)
    assert capsys.readouterr().err == ""
