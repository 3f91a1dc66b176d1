"""RL settings (the `rl:` YAML section / RL flags) and the algorithm presets.

`--algorithm` picks a preset of (advantage estimator, token shaper, policy loss, clip ratios, aggregation);
`--advantage-estimator`, `--token-shaper` and `--policy-loss` override single parts (registry names or
`module:function`). Batch sizes count prompts: one RL step generates `rollout_batch_size x rollout_n`
responses and makes `rollout_batch_size / ppo_mini_batch_size` optimizer steps per PPO epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

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
}


@dataclass
class RLConfig:
    algorithm: str = "a3po"
    advantage_estimator: str | None = None  # override of the preset (name or module:function)
    token_shaper: str | None = None  # "none" disables shaping
    policy_loss: str | None = None
    loss_agg_mode: str | None = None  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    dual_clip_c: float = 3.0
    entropy_coef: float = 0.0
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
    rollout_kv_cache_gb: int = 1  # CPU only: vLLM KV cache size in whole GiB
    gpu_memory_utilization: float = 0.5  # CUDA only
    max_prompt_length: int = 64
    max_response_length: int = 16
    # updates
    ppo_mini_batch_size: int = 8  # prompts per optimizer step
    ppo_epochs: int = 1
    train_steps: int = 20
    dynamic_sampling: bool = False  # DAPO: drop all-correct / all-wrong groups, regenerate to fill the batch
    max_num_gen_batches: int = 4
    # data and rewards
    dataset: str = "synthetic:arithmetic:1"  # a parquet/jsonl path, or synthetic:arithmetic:LEVEL
    eval_dataset: str | None = None  # default: a held-out synthetic set of the same level
    reward: str = "arithmetic"  # arithmetic | math | math_dapo | module:function
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

    def resolved(self) -> tuple[str, str | None, str, float, float, str]:
        """(advantage, shaper or None, loss, clip_low, clip_high, aggregation) after applying overrides."""
        adv, shaper, loss, low, high, agg = PRESETS[self.algorithm]
        shaper = self.token_shaper if self.token_shaper is not None else shaper
        return (self.advantage_estimator or adv, None if shaper in (None, "none") else shaper,
                self.policy_loss or loss, self.clip_ratio_low if self.clip_ratio_low is not None else low,
                self.clip_ratio_high if self.clip_ratio_high is not None else high, self.loss_agg_mode or agg)


def validate_rl(rl: RLConfig, *, world_size: int, dp: int, micro_batch_size: int) -> None:
    from megatron_a3po.config import ConfigError

    if rl.algorithm not in PRESETS:
        raise ConfigError(f"--algorithm {rl.algorithm!r} is unknown; choose one of {', '.join(PRESETS)}")
    aggregation = rl.resolved()[5]
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
    if rl.max_num_gen_batches < 0:
        raise ConfigError(f"--max-num-gen-batches must be >= 0 (rounds of generation per step with "
                          f"--dynamic-sampling; 0: no cap), got {rl.max_num_gen_batches}")
