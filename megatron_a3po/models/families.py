"""HF model families (llama, qwen2/qwen2.5, qwen3) -> one architecture description.

`ModelArch` is the family-independent description both sides need: the Megatron model builder turns it
into a TransformerConfig, the HF mapping uses it for QKV / GLU layouts, the converter checks it against
stored metadata. Reading an HF config.json is the only family-specific part.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_a3po.dtypes import dtype_name
from megatron_a3po.errors import UserError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocab so every TP rank gets an equal shard, a multiple of --make-vocab-size-divisible-by."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


class UnsupportedModelError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    torch_dtype: str  # the HF checkpoint's own dtype name, e.g. "float32", "bfloat16"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelArch":
        return cls(**data)


def _rope_theta(cfg: dict) -> float:
    # transformers >= 5 nests it in rope_parameters; older configs keep it at top level.
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        return 10000.0
    rope_type = params.get("rope_type") or (cfg.get("rope_scaling") or {}).get("rope_type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported yet; supported: plain RoPE (rope_type 'default')"
        )
    return float(theta)


def arch_from_hf_config(cfg: dict) -> ModelArch:
    """Translate an HF config.json dict; refuse anything we would silently get wrong."""
    archs = cfg.get("architectures") or []
    family = SUPPORTED_ARCHITECTURES.get(archs[0]) if archs else None
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
            + ", ".join(f"{a} ({f})" for a, f in SUPPORTED_ARCHITECTURES.items())
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported; only silu (SwiGLU)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    heads = cfg["num_attention_heads"]
    qkv_bias = {"llama": bool(cfg.get("attention_bias", False)), "qwen2": True,
                "qwen3": bool(cfg.get("attention_bias", False))}[family]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return ModelArch(
        family=family,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=dtype_name(dtype),
    )


def load_hf_arch(hf_path: str | Path) -> tuple[ModelArch, dict]:
    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --hf-path must be a Hugging Face model directory")
    cfg = json.loads(path.read_text())
    return arch_from_hf_config(cfg), cfg
