"""Resolve user hooks given as "package.module:function" (advantages, shapers, losses, rewards)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import `spec` ("package.module:attr.path"); errors name `what` (e.g. "advantage hook") and the fix."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc}); "
                         "make sure it is on PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a function")
    return obj
