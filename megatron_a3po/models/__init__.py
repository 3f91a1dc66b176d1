"""HF model families -> Megatron GPTModel: architecture description, layer specs, building and loading."""

from megatron_a3po.models.families import SUPPORTED_ARCHITECTURES, ModelArch, UnsupportedModelError, load_hf_arch

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelArch", "UnsupportedModelError", "load_hf_arch"]
