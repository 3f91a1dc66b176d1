"""Small shared helpers: input validation with actionable errors, config coercion, masked reductions.

Every public function in `algorithms/` validates its inputs with these helpers so a bad call fails at the
call site with a ValueError that names the parameter and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

import torch

C = TypeVar("C")


def check_tensor(name: str, value: Any, *, ndim: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}; convert it with torch.as_tensor(...)")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but must match {tuple(shape)}; "
            "pass tensors of the same [batch, response_length] layout (same padding)"
        )
    return value


def check_mask(name: str, mask: Any, *, ndim: int = 2) -> torch.Tensor:
    """Return `mask` as a bool tensor; 0/1 float or int masks are accepted."""
    mask = check_tensor(name, mask, ndim=ndim)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return mask != 0
    raise ValueError(f"{name} must be a bool or 0/1 tensor, got dtype {mask.dtype}")


def check_fraction(name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}; e.g. 0.2 selects 20% of the tokens")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            as_int = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"step must be an int (the global RL step counted from 1), got {step!r}") from None
        if as_int != step:
            raise ValueError(f"step must be an integer (the global RL step counted from 1), got {step!r}")
        step = as_int
    if step < 1:
        raise ValueError(f"step must be >= 1 (the global RL step is counted from 1: the first update is step 1), got {step}")
    return step


def check_finite_where(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """One reduction + one host sync: NaN/inf inside the mask would silently corrupt a top-k selection."""
    bad = (~torch.isfinite(values)) & mask
    if bool(bad.any()):
        n = int(bad.sum())
        raise ValueError(f"{name} has {n} non-finite values inside response_mask; check the log-prob/entropy computation")


def coerce_config(config: Any, cls: type[C], param: str = "config") -> C:
    """None → defaults, Mapping → cls(**mapping) (unknown keys rejected), cls instance → itself."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{param} has unknown keys {unknown} for {cls.__name__}; valid keys: {sorted(known)}")
        return cls(**config)
    raise ValueError(f"{param} must be a {cls.__name__}, a dict of its fields, or None; got {type(config).__name__}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over mask==True entries; 0 when the mask is empty (metrics only: never a loss normaliser)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
