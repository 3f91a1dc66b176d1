"""Names of floating-point dtypes, one table: flags (bf16), HF config / checkpoint metadata (bfloat16), torch.

torch is imported only where a torch dtype is made, so config-only code (planner, families) stays light.
"""

from __future__ import annotations

# every accepted spelling -> the canonical name (HF configs', our checkpoint metadata's, torch's attribute)
CANONICAL = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
             "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(dtype) -> str:
    """torch.bfloat16, 'torch.bfloat16', 'bf16' -> 'bfloat16' (unknown spellings are returned as given)."""
    name = str(dtype).removeprefix("torch.")
    return CANONICAL.get(name, name)


def parse_dtype(name: str):
    """'bf16' / 'bfloat16' / 'torch.bfloat16' -> torch.bfloat16; ValueError naming the choices otherwise."""
    import torch

    canonical = CANONICAL.get(str(name).removeprefix("torch."))
    if canonical is None:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(CANONICAL)}")
    return getattr(torch, canonical)


def params_dtype(model_cfg):
    """The training params dtype of a ModelConfig (--bf16 / --fp16, else fp32)."""
    return parse_dtype(precision_name(model_cfg))


def precision_name(model_cfg) -> str:
    """'bf16' | 'fp16' | 'fp32' of a ModelConfig: the flag spelling, for reports."""
    return "bf16" if model_cfg.bf16 else "fp16" if model_cfg.fp16 else "fp32"
