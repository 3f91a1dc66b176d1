"""Name → function registries for advantage estimators, token shapers and policy losses.

Every getter accepts a registered name or a user hook "package.module:function" (imported on demand).
Hook signatures:
    advantage fn: fn(rewards[B], response_mask[B, T], groups, config=None) -> AdvantageOutput
    shaper:       fn(ctx: AlgoContext) -> weights[B, T]; optional attribute `phase` = "step" | "microbatch"
    policy loss:  fn(ctx: AlgoContext) -> (loss_mat[B, T], metrics dict)
A hook declares its settings, phase, needed inputs and metrics with `components.component` (decorator).
"""

from __future__ import annotations

from typing import Any, Callable

from .advantages import ADVANTAGE_FNS
from .losses import POLICY_LOSSES
from .shaping import SHAPERS

_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {
    "advantage": ADVANTAGE_FNS,
    "shaper": SHAPERS,
    "policy_loss": POLICY_LOSSES,
}
PHASES = ("step", "microbatch")


def _resolve(kind: str, name: Any) -> Callable[..., Any]:
    registry = _REGISTRIES[kind]
    if callable(name):
        return name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} must be a registered name {sorted(registry)} or 'module:function', got {name!r}")
    if name in registry:
        return registry[name]
    if ":" not in name:
        raise ValueError(
            f"unknown {kind} {name!r}; registered: {sorted(registry)}. "
            "For your own function pass 'package.module:function'."
        )
    from megatron_a3po.hooks import import_callable

    return import_callable(name, f"{kind} hook")


def get_advantage_fn(name: str | Callable) -> Callable[..., Any]:
    return _resolve("advantage", name)


def get_shaper(name: str | Callable) -> Callable[..., Any]:
    fn = _resolve("shaper", name)
    shaper_phase(fn)  # validate a hook's declared phase early
    return fn


def get_policy_loss(name: str | Callable) -> Callable[..., Any]:
    return _resolve("policy_loss", name)


def get_component(kind: str, name: str | Callable) -> Callable[..., Any]:
    """The function registered as `name` (or imported from 'module:function') in registry `kind`."""
    if kind not in _REGISTRIES:
        raise ValueError(f"kind must be one of {sorted(_REGISTRIES)}, got {kind!r}")
    return get_shaper(name) if kind == "shaper" else _resolve(kind, name)


def shaper_phase(fn: Callable[..., Any]) -> str:
    """'step' (default: once per RL step from the old policy) or 'microbatch' (inside the loss)."""
    phase = getattr(fn, "phase", "step")
    if phase not in PHASES:
        raise ValueError(f"shaper {getattr(fn, '__name__', fn)!r} has phase={phase!r}; it must be one of {list(PHASES)}")
    return phase


def register(kind: str, name: str, fn: Callable[..., Any] | None = None):
    """Register `fn` under `name` in registry `kind` ("advantage" | "shaper" | "policy_loss"); usable as a decorator."""
    if kind not in _REGISTRIES:
        raise ValueError(f"kind must be one of {sorted(_REGISTRIES)}, got {kind!r}")

    def _do(f: Callable[..., Any]) -> Callable[..., Any]:
        existing = _REGISTRIES[kind].get(name)
        if existing is not None and existing is not f:
            raise ValueError(f"{kind} {name!r} is already registered to {existing!r}; pick another name")
        _REGISTRIES[kind][name] = f
        return f

    return _do(fn) if fn is not None else _do


def names(kind: str) -> list[str]:
    if kind not in _REGISTRIES:
        raise ValueError(f"kind must be one of {sorted(_REGISTRIES)}, got {kind!r}")
    return sorted(_REGISTRIES[kind])
