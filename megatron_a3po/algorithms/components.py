"""What an algorithm component (advantage estimator, token shaper, policy loss) declares about itself.

A component is a registered function (or a user's `module:function`) decorated with `@component(...)`:

    @component(settings=MyShaperConfig, phase="step", needs=("old_entropy",), metrics=my_metrics)
    def my_shaper(ctx: AlgoContext) -> torch.Tensor: ...

- `settings`: a dataclass with defaults (and validation in `__post_init__`); the component receives an instance
  as `ctx.config` (advantage estimators: as `config=`). YAML nests its fields: `shaper: {name: ..., key: value}`.
- `phase` (shapers): "step" (once per RL step from the old policy) or "microbatch" (inside the loss).
- `needs`: the inputs the trainer must compute for it (`INPUTS`); a tuple, or a function of the settings.
- `metrics(settings, step) -> {name: float}`: logged every step.
- `reads`: the settings fields the component uses (default: all of them). Settings classes are shared between
  components of one kind (every PPO-style loss takes `PolicyLossConfig`), so a component names what it reads and
  `bind` refuses any other setting given to it: a setting the algorithm ignores is an error, never a no-op.
- `aggregation` (policy losses): the one loss aggregation the loss is defined with (GSPO: seq-mean-token-mean);
  any other `--loss-agg-mode` is refused.
- `group_baseline` (advantage estimators): A_i is measured against the other responses of its prompt, so a group of
  one response has nothing to compare with; `--rollout-n 1` is refused for it.

An undecorated function is a component with no settings class (its config is passed through as given), no needs
and its `phase` attribute (default "step").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .common import coerce_config

# Inputs a component can ask for; the trainer computes exactly the union of what the resolved algorithm needs.
INPUTS = {
    "old_logprobs": "old-policy log-probs of the sampled tokens (old-log-prob pass, or vLLM's with "
                    "--use-rollout-logprobs)",
    "old_entropy": "old-policy token entropy (old-log-prob pass)",
    "proxy_logprobs": "log-probs under the old policy's min-p proxy (old-log-prob pass; the settings' minp_kappa)",
    "rollout_logprobs": "vLLM's log-probs of the sampled tokens (the behaviour policy)",
    "ref_logprobs": "the frozen reference policy's log-probs (needs --kl-coef > 0: the reference model is built)",
    "entropy": "current-policy token entropy inside the loss, detached",
    "entropy_grad": "current-policy token entropy inside the loss, with gradient",
    "correct": "per response, whether the verifier judged it correct (its reward before the overlong penalty > 0; "
               "advantage estimators receive it as correct=)",
}
PHASES = ("step", "microbatch")


@dataclass(frozen=True)
class Declaration:
    settings: type | None = None
    phase: str = "step"
    needs: tuple[str, ...] | Callable[[Any], Iterable[str]] = ()
    metrics: Callable[[Any, int], dict[str, float]] | None = None
    reads: tuple[str, ...] | None = None  # None: every settings field
    group_baseline: bool = False
    aggregation: str | None = None  # None: any aggregation mode


def component(*, settings: type | None = None, phase: str = "step",
              needs: Iterable[str] | Callable[[Any], Iterable[str]] = (),
              metrics: Callable[[Any, int], dict[str, float]] | None = None,
              reads: Iterable[str] | None = None, group_baseline: bool = False, aggregation: str | None = None):
    """Decorator: declare a component's settings, phase, needed inputs, metrics, the settings it reads and whether
    it needs a group baseline (see the module doc)."""
    if settings is not None and not dataclasses.is_dataclass(settings):
        raise ValueError(f"component settings must be a dataclass, got {settings!r}")
    if reads is not None:
        reads = tuple(reads)
        fields = {f.name for f in dataclasses.fields(settings)} if settings is not None else set()
        unknown = sorted(set(reads) - fields)
        if unknown:
            raise ValueError(f"component(reads=...) names {unknown}, which are not fields of {settings!r}")
    if phase not in PHASES:
        raise ValueError(f"component phase must be one of {list(PHASES)}, got {phase!r}")
    if not callable(needs):
        needs = tuple(needs)
        _check_needs(needs, "component(needs=...)")

    def declare(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.declaration = Declaration(settings, phase, needs, metrics, reads, group_baseline, aggregation)  # type: ignore
        fn.phase = phase  # type: ignore[attr-defined]  # what registry.shaper_phase reads
        return fn

    return declare


def declaration(fn: Callable[..., Any]) -> Declaration:
    declared = getattr(fn, "declaration", None)
    return declared if isinstance(declared, Declaration) else Declaration(phase=getattr(fn, "phase", "step"))


def _check_needs(needs: Iterable[str], where: str) -> frozenset[str]:
    needs = frozenset(needs)
    unknown = sorted(needs - set(INPUTS))
    if unknown:
        raise ValueError(f"{where}: unknown inputs {unknown}; a component can need {sorted(INPUTS)}")
    return needs


@dataclass(frozen=True)
class Bound:
    """A component resolved once: its function and its settings instance."""

    kind: str  # "advantage" | "shaper" | "policy_loss"
    name: str  # registered name, or the hook's "module:function"
    fn: Callable[..., Any]
    settings: Any  # an instance of the declared settings class; a hook without one: its config as given (or None)
    declared: Declaration

    @property
    def label(self) -> str:
        """The name without a hook's module path, for metric names."""
        return self.name.rsplit(":", 1)[-1]

    @property
    def phase(self) -> str:
        return self.declared.phase

    @property
    def needs(self) -> frozenset[str]:
        needs = self.declared.needs
        return _check_needs(needs(self.settings) if callable(needs) else needs, f"{self.kind} {self.name!r}")

    def metrics(self, step: int) -> dict[str, float]:
        return dict(self.declared.metrics(self.settings, step)) if self.declared.metrics else {}


def bind(kind: str, name: str, fn: Callable[..., Any], settings: Mapping[str, Any] | None = None) -> Bound:
    """Build the component's settings from `settings` (unknown keys, settings it does not read and bad values
    raise ValueError)."""
    declared = declaration(fn)
    ignored = sorted(set(settings or {}) - set(settings_read(fn))) if declared.reads is not None else []
    if ignored:
        raise ValueError(f"{kind} {name!r} does not read {', '.join(ignored)} (it reads "
                         f"{', '.join(settings_read(fn)) or 'no settings'}); remove "
                         f"{'it' if len(ignored) == 1 else 'them'}, or choose a {kind} that uses "
                         f"{'it' if len(ignored) == 1 else 'them'}")
    if declared.settings is not None:
        config = coerce_config(dict(settings or {}), declared.settings, f"{kind} {name!r} settings")
    else:
        config = dict(settings) if settings else None
    return Bound(kind, name, fn, config, declared)


def settings_fields(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The settings field names a component declares (empty for a hook without a settings class)."""
    cls = declaration(fn).settings
    return tuple(f.name for f in dataclasses.fields(cls)) if cls is not None else ()


def settings_read(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The settings fields a component reads (its `reads`, else every field of its settings class)."""
    declared = declaration(fn)
    return declared.reads if declared.reads is not None else settings_fields(fn)
