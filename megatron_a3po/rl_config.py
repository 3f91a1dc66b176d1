"""RL settings (the `rl:` YAML section / RL flags), the algorithm presets, and their resolution into one
`algorithms.Algorithm`.

`--algorithm` picks a preset of (advantage estimator, token shaper, policy loss, clip ratios, aggregation);
`--advantage-estimator`, `--token-shaper` and `--policy-loss` override single parts (registry names or
`module:function`). In YAML a part may carry its settings: `shaper: {name: a3po, ratio: 0.2, rho_pos: 2.0}`
(`advantage:`, `shaper:`, `loss:` are the short keys). The older flat settings stay aliases: `--a3po-ratio` is
the a3po shaper's `ratio` (any RL field `<component>_<setting>`), and `--clip-ratio-low/high`, `--dual-clip-c`
feed the policy loss's fields of those names. Batch sizes count prompts: one RL step generates
`rollout_batch_size x rollout_n` responses and makes `rollout_batch_size / ppo_mini_batch_size` optimizer steps
per PPO epoch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from megatron_a3po.errors import ConfigError, flag_name

PRESETS = {
    # name: (advantage, shaper, loss, clip_low, clip_high, aggregation)
    "a3po": ("grpo", "a3po", "ppo_clip", 0.2, 0.28, "token-mean"),
    "dapo": ("grpo", None, "ppo_clip", 0.2, 0.28, "token-mean"),
    "grpo": ("grpo", None, "ppo_clip", 0.2, 0.2, "seq-mean-token-mean"),
    "dr_grpo": ("dr_grpo", None, "ppo_clip", 0.2, 0.28, "seq-mean-token-sum-norm"),
    "psr": ("psr", None, "ppo_clip", 0.2, 0.28, "token-mean"),
    "nsr": ("nsr", None, "ppo_clip", 0.2, 0.28, "token-mean"),
    "w_reinforce": ("w_reinforce", None, "ppo_clip", 0.2, 0.28, "token-mean"),
    "fork_tokens": ("grpo", "fork_tokens", "ppo_clip", 0.2, 0.28, "token-mean"),
    "clip_cov": ("grpo", None, "clip_cov", 0.2, 0.28, "token-mean"),
    "kl_cov": ("grpo", None, "kl_cov", 0.2, 0.28, "token-mean"),
    "lp_reg": ("grpo", None, "lp_reg", 0.2, 0.28, "token-mean"),
    "rloo": ("rloo", None, "ppo_clip", 0.2, 0.28, "token-mean"),
    "reinforce_plus_plus_baseline": ("reinforce_plus_plus_baseline", None, "ppo_clip", 0.2, 0.28, "token-mean"),
    "gspo": ("grpo", None, "gspo", 3e-4, 4e-4, "seq-mean-token-mean"),
}


class AlgorithmChoice(NamedTuple):
    """The preset's parts after overrides; advantage / shaper / loss are a name or {name: ..., setting: value}."""

    advantage: str | dict
    shaper: str | dict | None
    loss: str | dict
    aggregation: str


@dataclass
class RLConfig:
    # YAML short keys of the `rl:` section
    YAML_ALIASES: ClassVar[dict[str, str]] = {"advantage": "advantage_estimator", "shaper": "token_shaper",
                                              "loss": "policy_loss"}

    algorithm: str = "a3po"
    advantage_estimator: str | dict | None = None  # override of the preset (name, module:function, or {name: ...})
    token_shaper: str | dict | None = None  # "none" disables shaping
    policy_loss: str | dict | None = None
    loss_agg_mode: str | None = None  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    dual_clip_c: float = 3.0
    entropy_coef: float = 0.0
    # reference-policy KL (off unless kl_coef > 0; the reference is --ref-load, default the starting weights)
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl | abs
    # rollout-training mismatch correction (off by default; see algorithms/correction.py)
    rollout_correction: str = "none"  # none | tis | mis | icepop | seq-tis | seq-mis
    rollout_correction_threshold: float = 2.0
    rollout_correction_threshold_low: float | None = None
    use_rollout_logprobs: bool = False  # vLLM's log-probs as pi_old: no old-log-prob forward pass
    # A3PO (paper defaults)
    a3po_ratio: float = 0.2
    a3po_rho_pos: float = 2.0
    a3po_alpha_pos: float = 0.005
    a3po_rho_neg: float = 2.0
    a3po_alpha_neg: float = 0.005
    a3po_metric: str = "prob"
    a3po_schedule: str = "linear"
    # rollout
    rollout_batch_size: int = 32  # prompts per RL step
    rollout_n: int = 8  # responses per prompt
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_top_k: int = -1
    rollout_tensor_parallel_size: int = 1
    rollout_dtype: str = "auto"  # vLLM's weights and compute: auto (= the training dtype) | bfloat16 | float16 | float32
    rollout_kv_cache_gb: int = 1  # CPU only: vLLM KV cache size in whole GiB
    gpu_memory_utilization: float = 0.5  # CUDA only
    max_prompt_length: int = 64
    max_response_length: int = 16
    # updates
    ppo_mini_batch_size: int = 8  # prompts per optimizer step
    ppo_epochs: int = 1
    train_steps: int = 20
    dynamic_sampling: bool = False  # DAPO: drop all-correct / all-wrong groups, regenerate to fill the batch
    max_num_gen_batches: int = 4  # at most this many generation rounds per step (>= 1)
    # data and rewards
    dataset: str = "synthetic:arithmetic:1"  # a parquet/jsonl path, or synthetic:arithmetic:LEVEL
    eval_dataset: str | None = None  # default: a held-out synthetic set of the same level
    reward: str = "arithmetic"  # arithmetic | math | math_dapo | module:function
    # DAPO soft overlong punishment: reward += penalty in [-factor, 0] over the last buffer_len tokens; 0: off
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    raw_prompt: bool = True  # encode prompts as text (no chat template)
    # evaluation and logging
    eval_interval: int = 0  # 0: only before and after training
    eval_prompts: int = 64
    eval_n: int = 8
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    output_dir: str = "runs/latest"
    export_hf: str | None = None  # write the final policy here as an HF checkpoint
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    # run guards
    max_consecutive_nan_steps: int = 3  # stop after this many steps in a row with skipped NaN/Inf updates; 0: never

    def resolved(self) -> AlgorithmChoice:
        """The preset with the overrides applied (names; settings, clip ratios included, are resolved by
        `resolve_algorithm`)."""
        adv, shaper, loss, _, _, agg = PRESETS[self.algorithm]
        shaper = self.token_shaper if self.token_shaper is not None else shaper
        return AlgorithmChoice(self.advantage_estimator or adv, None if shaper in (None, "none") else shaper,
                               self.policy_loss or loss, self.loss_agg_mode or agg)


_DEFAULTS = RLConfig()
# RL fields that feed a component setting of the same name (whichever component declares it)
_FIELDS = {"advantage": "advantage_estimator", "shaper": "token_shaper", "policy_loss": "policy_loss"}
_REGULARISERS = ("entropy_coef", "kl_coef", "kl_type")  # the Algorithm's, for every loss; no component's setting
_SHARED_SETTINGS = ("clip_ratio_low", "clip_ratio_high", "dual_clip_c")


def resolve_algorithm(rl: RLConfig):
    """The run's `algorithms.Algorithm`, resolved once. Raises ConfigError naming the setting and the fix, also for
    a setting the resolved algorithm would not read (a no-op the user believes in)."""
    from megatron_a3po import algorithms as A

    choice = rl.resolved()
    try:
        parts = {kind: _bind(kind, spec, rl, _preset_settings(rl, kind, spec)) if spec is not None else None
                 for kind, spec in (("advantage", choice.advantage), ("shaper", choice.shaper),
                                    ("policy_loss", choice.loss))}
        regularisers = A.RegulariserConfig(entropy_coef=rl.entropy_coef, kl_coef=rl.kl_coef, kl_type=rl.kl_type)
        correction = A.RolloutCorrectionConfig(rl.rollout_correction, rl.rollout_correction_threshold,
                                               rl.rollout_correction_threshold_low)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    algorithm = A.Algorithm(parts["advantage"], parts["shaper"], parts["policy_loss"], choice.aggregation,
                            regularisers, correction)
    required = algorithm.loss.declared.aggregation
    if required is not None and algorithm.aggregation != required:
        raise ConfigError(f"the policy loss {algorithm.loss.name!r} is defined with --loss-agg-mode {required}, "
                          f"got {algorithm.aggregation}; drop --loss-agg-mode (its preset sets it) or set {required}")
    _refuse_unread_fields(rl, algorithm)
    return algorithm


def _preset_settings(rl: RLConfig, kind: str, spec: str | dict) -> dict[str, Any]:
    """The preset's clip ratios, for a loss that reads the preset loss's settings class (a loss with settings of
    its own, e.g. gspo under --algorithm dapo, keeps its own defaults: 0.2 would be no clip range for it)."""
    from megatron_a3po import algorithms as A

    _, _, preset_loss, low, high, _ = PRESETS[rl.algorithm]
    if kind != "policy_loss":
        return {}
    chosen = A.declaration(A.get_component(kind, component_name(spec))).settings
    return {"clip_ratio_low": low, "clip_ratio_high": high} \
        if chosen is not None and chosen is A.declaration(A.get_policy_loss(preset_loss)).settings else {}


def _refuse_unread_fields(rl: RLConfig, algorithm) -> None:
    """Flat RL fields changed from their defaults that nothing in the resolved algorithm reads: a component's
    `<name>_<setting>` alias while that component is not used, the correction's thresholds with the correction
    off, the KL estimator without a KL term."""
    from megatron_a3po import algorithms as A

    loss_reads = set(A.settings_read(algorithm.loss.fn)) if algorithm.loss.declared.settings is not None else None
    for name in _SHARED_SETTINGS:  # flat clip flags for a loss whose settings lack the field (gspo: dual clip)
        if loss_reads is not None and name not in loss_reads and getattr(rl, name) not in (None,
                                                                                           getattr(_DEFAULTS, name)):
            raise ConfigError(f"{flag_name(name)} {getattr(rl, name)}: the policy loss {algorithm.loss.name!r} does "
                              f"not read {name} (it reads {', '.join(sorted(loss_reads)) or 'no settings'}); drop it, "
                              "or choose a policy loss that uses it")
    used = {part.name for part in algorithm.components}
    for field in dataclasses.fields(RLConfig):
        value = getattr(rl, field.name)
        if value == getattr(_DEFAULTS, field.name):
            continue
        for kind in _FIELDS:
            for name in A.names(kind):
                if field.name.startswith(f"{name}_") and field.name[len(name) + 1:] in \
                        A.settings_fields(A.get_component(kind, name)) and name not in used:
                    raise ConfigError(f"{flag_name(field.name)} {value} sets the {kind} {name!r}, which "
                                      f"--algorithm {rl.algorithm} does not use ({algorithm.describe()}); drop "
                                      f"it, or use {flag_name(_FIELDS[kind])} {name}")
    if not algorithm.correction.enabled:
        for name in ("rollout_correction_threshold", "rollout_correction_threshold_low"):
            if getattr(rl, name) != getattr(_DEFAULTS, name):
                raise ConfigError(f"{flag_name(name)} {getattr(rl, name)} is read only by a rollout correction, "
                                  "which is off; drop it, or set --rollout-correction tis|mis|icepop|seq-tis|seq-mis")
    if rl.kl_type != _DEFAULTS.kl_type and rl.kl_coef == 0:
        raise ConfigError(f"--kl-type {rl.kl_type} is read only by the KL-to-reference term, which is off "
                          "(--kl-coef 0); drop it, or set --kl-coef > 0")


def component_name(spec: str | dict) -> str:
    if isinstance(spec, dict):
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a component given as a mapping needs a `name:` (a registered name or "
                             f"'module:function'), got {spec!r}")
        return name
    return spec


def _bind(kind: str, spec: str | dict, rl: RLConfig, preset: dict[str, Any]):
    """Settings precedence: the component's defaults < preset values < flat RL fields (aliases) < nested YAML;
    a flat field the user changed that disagrees with the nested value is an error (set it in one place), and
    so is a changed flat field, or a nested key, that the component does not read."""
    from megatron_a3po import algorithms as A

    name = component_name(spec)
    nested = {k.replace("-", "_"): v for k, v in spec.items() if k != "name"} if isinstance(spec, dict) else {}
    regulariser = sorted(set(nested) & set(_REGULARISERS))
    if regulariser:  # one place: they apply to every loss, and decide whether the reference policy is built
        raise ConfigError(f"rl.{_yaml_key(kind)}.{regulariser[0]}: set it as rl.{regulariser[0]} "
                          f"({flag_name(regulariser[0])}), not inside a component")
    fn = A.get_component(kind, name)
    reads = set(A.settings_read(fn))
    settings: dict[str, Any] = {}
    for key in A.settings_fields(fn):
        alias = f"{name}_{key}" if hasattr(_DEFAULTS, f"{name}_{key}") else key if key in _SHARED_SETTINGS else None
        if alias is None:
            continue
        value, changed = getattr(rl, alias), getattr(rl, alias) != getattr(_DEFAULTS, alias)
        if key not in reads:
            if changed and value is not None:
                raise ConfigError(f"{flag_name(alias)} {value}: the {kind} {name!r} does not read {key} (it reads "
                                  f"{', '.join(sorted(reads)) or 'no settings'}); drop it, or choose a {kind} "
                                  "that uses it")
            continue
        if value is None:
            if key not in preset:
                continue
            value, changed = preset[key], False
        if key in nested and changed and nested[key] != value:
            raise ConfigError(f"{flag_name(alias)} {value} and rl.{_yaml_key(kind)}.{key}: {nested[key]} disagree; "
                              "set it in one place")
        settings[key] = value
    settings.update(nested)
    try:
        return A.bind(kind, name, fn, settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{kind} {name!r} (rl.{_yaml_key(kind)} / {flag_name(_FIELDS[kind])}): {err}") from None


def _yaml_key(kind: str) -> str:
    """The short YAML key of a component kind: advantage, shaper, loss."""
    return {field: key for key, field in RLConfig.YAML_ALIASES.items()}[_FIELDS[kind]]


def validate_rl(rl: RLConfig, *, world_size: int, dp: int, micro_batch_size: int) -> None:

    if rl.algorithm not in PRESETS:
        raise ConfigError(f"--algorithm {rl.algorithm!r} is unknown; choose one of {', '.join(PRESETS)}")
    aggregation = rl.resolved().aggregation
    if aggregation not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ConfigError(f"--loss-agg-mode {aggregation!r} is unknown; choose token-mean, seq-mean-token-mean, "
                          "seq-mean-token-sum or seq-mean-token-sum-norm")
    for flag, value in (("--rollout-batch-size", rl.rollout_batch_size), ("--rollout-n", rl.rollout_n),
                        ("--ppo-mini-batch-size", rl.ppo_mini_batch_size), ("--train-steps", rl.train_steps),
                        ("--max-response-length", rl.max_response_length), ("--ppo-epochs", rl.ppo_epochs),
                        ("--max-prompt-length", rl.max_prompt_length)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if rl.rollout_batch_size % rl.ppo_mini_batch_size:
        raise ConfigError(f"--rollout-batch-size {rl.rollout_batch_size} must be a multiple of --ppo-mini-batch-size "
                          f"{rl.ppo_mini_batch_size} (both count prompts)")
    sequences = rl.ppo_mini_batch_size * rl.rollout_n
    if sequences % (micro_batch_size * dp):
        raise ConfigError(
            f"a mini-batch of --ppo-mini-batch-size {rl.ppo_mini_batch_size} prompts x --rollout-n {rl.rollout_n} = "
            f"{sequences} sequences must split into --micro-batch-size {micro_batch_size} x data-parallel size {dp}; "
            f"make it a multiple of {micro_batch_size * dp}")
    if rl.rollout_tensor_parallel_size < 1 or world_size % rl.rollout_tensor_parallel_size:
        raise ConfigError(f"--rollout-tensor-parallel-size {rl.rollout_tensor_parallel_size} must divide the world "
                          f"size {world_size}")
    if rl.rollout_temperature <= 0:
        raise ConfigError(f"--rollout-temperature must be > 0 for RL sampling, got {rl.rollout_temperature}")
    if not 0 < rl.rollout_top_p <= 1 or not 0 < rl.eval_top_p <= 1:
        raise ConfigError("--rollout-top-p and --eval-top-p must be in (0, 1]")
    if not 0 < rl.a3po_ratio <= 1:
        raise ConfigError(f"--a3po-ratio must be in (0, 1], got {rl.a3po_ratio}")
    if rl.a3po_metric not in ("prob", "entropy") or rl.a3po_schedule not in ("linear", "static"):
        raise ConfigError("--a3po-metric must be prob or entropy and --a3po-schedule linear or static")
    for flag, path in (("--dataset", rl.dataset), ("--eval-dataset", rl.eval_dataset)):
        if path and not path.startswith("synthetic:"):
            import os

            if not os.path.exists(path):
                raise ConfigError(f"{flag} {path}: file not found; give a parquet/jsonl file (DAPO-Math-17k schema) "
                                  "or synthetic:arithmetic:LEVEL")
    if rl.eval_interval < 0 or rl.eval_prompts < 1 or rl.eval_n < 1:
        raise ConfigError("--eval-interval must be >= 0, --eval-prompts and --eval-n >= 1")
    if rl.max_consecutive_nan_steps < 0:
        raise ConfigError(f"--max-consecutive-nan-steps must be >= 0 (0: never stop), "
                          f"got {rl.max_consecutive_nan_steps}")
    if rl.max_num_gen_batches < 1:
        raise ConfigError(f"--max-num-gen-batches must be >= 1 (rounds of generation per step with "
                          f"--dynamic-sampling: a cap, so hard data cannot generate forever), got "
                          f"{rl.max_num_gen_batches}")
    _validate_algorithm(rl)


def _validate_algorithm(rl: RLConfig) -> None:
    """The algorithm resolves (hooks import, settings are valid), and what it needs can be computed."""
    from megatron_a3po.algorithms import INPUTS

    for flag, value in (("--kl-coef", rl.kl_coef), ("--entropy-coef", rl.entropy_coef),
                        ("--overlong-penalty-factor", rl.overlong_penalty_factor)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    algorithm = resolve_algorithm(rl)
    if algorithm.advantage.declared.group_baseline and rl.rollout_n < 2:
        raise ConfigError(f"--rollout-n {rl.rollout_n} with the advantage estimator {algorithm.advantage.name!r}: "
                          "it compares each response with the other responses to its prompt, and one response "
                          "has none (no baseline to compare with: GRPO's A would be 0 for every response); use "
                          "--rollout-n >= 2, or an estimator without a group baseline (w_reinforce)")
    if rl.rollout_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"--rollout-dtype must be auto, bfloat16, float16 or float32, got {rl.rollout_dtype!r}")
    if not 0 <= rl.overlong_buffer_len <= rl.max_response_length:
        raise ConfigError(f"--overlong-buffer-len must be in [0, --max-response-length {rl.max_response_length}] "
                          f"(0: off; DAPO uses 4096 of 20480), got {rl.overlong_buffer_len}")
    if rl.use_rollout_logprobs:
        if algorithm.correction.enabled:
            raise ConfigError("--rollout-correction needs Megatron's old log-probs, which --use-rollout-logprobs "
                              "skips (the ratio would be 1); drop one of them")
        from_old_pass = sorted(algorithm.needs & {"old_entropy", "proxy_logprobs"})
        if from_old_pass:
            users = [p.name for p in algorithm.components if p.needs & set(from_old_pass)]
            raise ConfigError(f"{', '.join(users)} needs {', '.join(from_old_pass)} ({INPUTS[from_old_pass[0]]}), "
                              "which --use-rollout-logprobs skips; drop --use-rollout-logprobs")
