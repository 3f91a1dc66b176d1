"""The RL config resolved into one Algorithm: nested YAML settings, the flat flags as aliases, what each algorithm
needs computed, refusals of impossible combinations; the user-hook example of docs/algorithms.md; no import
circle in the algorithm library. In-process, no process group."""

from __future__ import annotations

import ast

import pytest
import torch

from megatron_a3po import algorithms as A
from megatron_a3po import config as C
from megatron_a3po.rl_config import RLConfig, resolve_algorithm
from megatron_a3po.job import resolve_job
from helpers import REPO

BASE = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2"]


def load(tmp_path, rl_yaml: str, *flags: str):
    path = tmp_path / "overlay.yaml"
    path.write_text(rl_yaml)
    cfg, _ = C.parse_args([*BASE, "--config", str(path), *flags])
    return cfg


def test_nested_settings_and_flat_aliases_resolve_to_the_same_component(tmp_path):
    nested = resolve_algorithm(load(tmp_path, "rl:\n  shaper: {name: a3po, ratio: 0.3, rho_neg: 1.5}\n").rl)
    flat = resolve_algorithm(RLConfig(a3po_ratio=0.3, a3po_rho_neg=1.5))
    assert nested.shaper.settings == flat.shaper.settings == A.A3POConfig(ratio=0.3, rho_neg=1.5)
    assert nested.metrics(100) == {"a3po/weight_pos": 1.5, "a3po/weight_neg": 1.0}  # max(2 - .5, 1), max(1.5 - .5, 1)
    # the preset's clip ratios reach the loss's settings; a flag overrides them; nesting works for the loss too
    assert (nested.loss.settings.clip_ratio_low, nested.loss.settings.clip_ratio_high) == (0.2, 0.28)
    loss = resolve_algorithm(load(tmp_path, "rl:\n  loss: {name: ppo_clip, dual_clip_c: 10.0}\n",
                                  "--clip-ratio-high", "0.3").rl).loss.settings
    assert (loss.clip_ratio_high, loss.dual_clip_c) == (0.3, 10.0)


def test_conflicting_or_unknown_settings_are_refused(tmp_path):
    with pytest.raises(C.ConfigError, match=r"--a3po-ratio 0.3 and rl.shaper.ratio: 0.25 disagree"):
        resolve_algorithm(load(tmp_path, "rl:\n  shaper: {name: a3po, ratio: 0.25}\n", "--a3po-ratio", "0.3").rl)
    with pytest.raises(C.ConfigError, match=r"unknown keys \['ration'\]"):
        resolve_algorithm(load(tmp_path, "rl:\n  shaper: {name: a3po, ration: 0.25}\n").rl)
    with pytest.raises(C.ConfigError, match=r"rl.loss.kl_coef: set it as rl.kl_coef \(--kl-coef\)"):
        resolve_algorithm(load(tmp_path, "rl:\n  loss: {name: ppo_clip, kl_coef: 0.1}\n").rl)
    with pytest.raises(C.ConfigError, match="needs a `name:`"):
        resolve_algorithm(load(tmp_path, "rl:\n  shaper: {ratio: 0.25}\n").rl)
    with pytest.raises(C.ConfigError, match="expected a single str"):
        load(tmp_path, "rl:\n  dataset: {name: x}\n")


@pytest.mark.parametrize("overlay, flags, message", [
    ("rl:\n  advantage: {name: w_reinforce, neg_weight: 2.0}\n", ["--algorithm", "w_reinforce"],
     "advantage 'w_reinforce' does not read neg_weight (it reads w_reinforce_lambda)"),
    ("rl:\n  advantage: {name: psr, pos_weight: 2.0}\n", ["--algorithm", "psr"], "'psr' does not read pos_weight"),
    ("rl:\n  advantage: {name: dr_grpo, norm_by_std: true}\n", ["--algorithm", "dr_grpo"],
     "'dr_grpo' does not read norm_by_std"),
    ("rl:\n  loss: {name: kl_cov, clip_cov_ratio: 0.1}\n", ["--algorithm", "kl_cov"],
     "'kl_cov' does not read clip_cov_ratio"),
    ("", ["--algorithm", "kl_cov", "--clip-ratio-low", "0.1"],
     "--clip-ratio-low 0.1: the policy_loss 'kl_cov' does not read clip_ratio_low"),
    ("", ["--algorithm", "kl_cov", "--dual-clip-c", "10"], "'kl_cov' does not read dual_clip_c"),
    ("", ["--algorithm", "gspo", "--dual-clip-c", "10"], "the policy loss 'gspo' does not read dual_clip_c"),
    ("", ["--algorithm", "gspo", "--loss-agg-mode", "token-mean"], "'gspo' is defined with --loss-agg-mode"),
    ("", ["--algorithm", "dapo", "--a3po-ratio", "0.3"],
     "--a3po-ratio 0.3 sets the shaper 'a3po', which --algorithm dapo does not use"),
    ("", ["--algorithm", "a3po", "--token-shaper", "none", "--a3po-rho-neg", "1.5"], "--a3po-rho-neg 1.5 sets"),
    ("", ["--rollout-correction-threshold", "3"], "--rollout-correction-threshold 3.0 is read only by a rollout"),
    ("", ["--kl-type", "k1"], "--kl-type k1 is read only by the KL-to-reference term, which is off"),
])
def test_a_setting_the_algorithm_does_not_read_is_refused(tmp_path, overlay, flags, message):
    """Issue 25 item 3: before, w_reinforce took neg_weight (and dapo --a3po-ratio, ...) and ignored it."""
    with pytest.raises(C.ConfigError) as err:
        resolve_algorithm(load(tmp_path, overlay or "rl: {}\n", *flags).rl)
    assert message in str(err.value)


def test_the_same_settings_are_read_where_they_apply(tmp_path):
    """The refusals above are not false alarms: each setting is accepted by a component that reads it, and every
    shipped config with every baseline overlay resolves."""
    resolve_algorithm(load(tmp_path, "rl:\n  advantage: {name: grpo, neg_weight: 2.0}\n").rl)
    resolve_algorithm(load(tmp_path, "rl:\n  advantage: {name: w_reinforce, w_reinforce_lambda: 0.5}\n").rl)
    resolve_algorithm(load(tmp_path, "rl: {}\n", "--algorithm", "kl_cov").rl)
    resolve_algorithm(load(tmp_path, "rl: {}\n", "--kl-type", "k1", "--kl-coef", "0.01").rl)
    resolve_algorithm(load(tmp_path, "rl: {}\n", "--rollout-correction", "tis",
                           "--rollout-correction-threshold", "3").rl)
    setups = sorted(REPO.glob("configs/*_a3po.yaml"))
    overlays = sorted(REPO.glob("configs/baselines/**/*.yaml"))
    assert len(setups) == 4 and len(overlays) >= 7
    for setup in setups:
        for overlay in [None, *overlays]:
            flags = ["--config", str(setup)] + (["--config", str(overlay)] if overlay else [])
            cfg, _ = C.parse_args(flags)
            resolve_algorithm(cfg.rl)


# The reference's released scripts (txy77/Sample-Polarity-of-RLVR debug/run_qwen3-4b{_grpo,-psr,-nsr}.sh with the
# verl ppo_trainer.yaml defaults they keep): (prompts per step, per mini-batch, warm-up RL steps)
REFERENCE_SCRIPTS = {"grpo": (32, 8, 0), "psr": (32, 8, 10), "nsr": (512, 32, 0)}


@pytest.mark.parametrize("name", sorted(REFERENCE_SCRIPTS))
def test_reference_presets_reproduce_the_released_scripts(name):
    prompts, mini, warmup_rl_steps = REFERENCE_SCRIPTS[name]
    cfg, _ = C.parse_args(["--config", str(REPO / "configs/qwen3-8b-base_a3po.yaml"), "--config",
                           str(REPO / f"configs/baselines/reference/{name}.yaml")])
    algorithm = resolve_algorithm(cfg.rl)
    assert (algorithm.advantage.name, algorithm.shaper, algorithm.loss.name) == (name, None, "ppo_clip")
    loss = algorithm.loss.settings
    assert (loss.clip_ratio_low, loss.clip_ratio_high, loss.dual_clip_c) == (0.2, 0.2, 3.0)
    assert algorithm.aggregation == "seq-mean-token-mean"
    assert (algorithm.regularisers.kl_coef, algorithm.regularisers.kl_type, algorithm.regularisers.entropy_coef) \
        == (0.001, "low_var_kl", 0.0)
    rl, t = cfg.rl, cfg.training
    assert (rl.rollout_batch_size, rl.ppo_mini_batch_size, rl.rollout_n, rl.ppo_epochs) == (prompts, mini, 8, 1)
    assert (rl.rollout_temperature, rl.rollout_top_p, rl.rollout_top_k) == (1.0, 1.0, -1)
    assert (rl.eval_n, rl.eval_temperature, rl.eval_top_p) == (8, 0.6, 0.95)
    assert (rl.overlong_buffer_len, rl.dynamic_sampling) == (0, False)
    assert (t.lr, t.min_lr, t.weight_decay, t.clip_grad) == (1e-6, 1e-6, 0.01, 1.0)
    assert t.lr_warmup_iters == warmup_rl_steps * prompts // mini  # verl warms up per RL step, Megatron per update


@pytest.mark.parametrize("flags, needs, absent", [
    (["--algorithm", "a3po"], {"old_logprobs"}, {"old_entropy", "entropy", "proxy_logprobs", "ref_logprobs"}),
    (["--algorithm", "a3po", "--a3po-metric", "entropy"], {"old_entropy"}, {"entropy"}),
    (["--algorithm", "fork_tokens"], {"entropy"}, {"entropy_grad"}),
    (["--algorithm", "lp_reg"], {"proxy_logprobs"}, {"entropy"}),
    (["--algorithm", "dapo", "--entropy-coef", "0.01"], {"entropy_grad"}, set()),
    (["--algorithm", "dapo", "--kl-coef", "0.1"], {"ref_logprobs"}, set()),
    (["--algorithm", "dapo", "--rollout-correction", "tis"], {"rollout_logprobs"}, {"old_entropy"}),
])
def test_the_algorithm_says_what_to_compute(flags, needs, absent):
    cfg, _ = C.parse_args([*BASE, *flags])
    algorithm = resolve_algorithm(cfg.rl)
    assert needs <= algorithm.needs and not absent & algorithm.needs
    assert algorithm.minp_kappa == (0.02 if "proxy_logprobs" in needs else None)


@pytest.mark.parametrize("flags, message", [
    (["--use-rollout-logprobs", "--rollout-correction", "tis"], "--rollout-correction needs Megatron's old log-probs"),
    (["--use-rollout-logprobs", "--algorithm", "lp_reg"], "lp_reg needs proxy_logprobs"),
    (["--use-rollout-logprobs", "--a3po-metric", "entropy"], "a3po needs old_entropy"),
    (["--rollout-correction", "icepop", "--rollout-correction-threshold", "nan"], "--rollout-correction-threshold"),
    (["--rollout-correction", "sometimes"], "--rollout-correction"),
    (["--kl-coef", "nan"], "--kl-coef must be a finite number"),
    (["--kl-coef", "0.1", "--kl-type", "k9"], "kl_type must be one of"),
    (["--ref-load", "/nonexistent"], "--ref-load is the reference policy of the KL penalty; it needs --kl-coef"),
    (["--kl-coef", "0.1", "--ref-load", "/"], "--ref-load /: neither an HF model dir"),
    (["--overlong-buffer-len", "9"], "--overlong-buffer-len must be in [0, --max-response-length 8]"),
    (["--rollout-dtype", "fp8"], "--rollout-dtype must be"),
    (["--token-shaper", "no_such_shaper"], "unknown shaper 'no_such_shaper'"),
    (["--algorithm", "grpo", "--rollout-n", "1", "--micro-batch-size", "4", "--ppo-mini-batch-size", "4",
      "--rollout-batch-size", "4"],
     "--rollout-n 1 with the advantage estimator 'grpo': it compares each response with the other responses"),
    (["--algorithm", "a3po", "--rollout-n", "1", "--micro-batch-size", "4", "--ppo-mini-batch-size", "4",
      "--rollout-batch-size", "4"],
     "--rollout-n 1 with the advantage estimator 'grpo'"),
])
def test_impossible_combinations_are_refused(flags, message):
    cfg, _ = C.parse_args([*BASE, *flags])
    with pytest.raises(C.ConfigError) as err:
        cfg = resolve_job(cfg, 2).cfg
    assert message in str(err.value)


def test_one_response_per_prompt_is_fine_without_a_group_baseline():
    cfg, _ = C.parse_args([*BASE, "--algorithm", "w_reinforce", "--rollout-n", "1", "--micro-batch-size", "4",
                           "--ppo-mini-batch-size", "4", "--rollout-batch-size", "4"])
    assert resolve_job(cfg, 2).cfg.rl.rollout_n == 1


def test_microbatch_shaper_goes_through_the_algorithm_loss():
    """Algorithm.micro_batch_loss applies fork_tokens (phase microbatch) exactly as compute_policy_loss does."""
    algorithm = resolve_algorithm(RLConfig(algorithm="fork_tokens"))
    assert algorithm.shape(A.AlgoContext(response_mask=torch.ones(1, 2, dtype=torch.bool))) is None  # not step-level
    torch.manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.bool)
    logp = (torch.randn(2, 5) - 1).requires_grad_()
    ctx = A.AlgoContext(response_mask=mask, advantages=torch.tensor([[1.0] * 5, [-1.0] * 5]), logprobs=logp,
                        old_logprobs=logp.detach() + 0.05, entropy=torch.rand(2, 5))
    got, _ = algorithm.micro_batch_loss(ctx)
    want, _ = A.compute_policy_loss(ctx, "ppo_clip", loss_config=algorithm.loss.settings, shaper="fork_tokens",
                                    agg_mode="token-mean")
    weights = A.fork_token_weights(ctx.entropy, mask, ratio=0.2)
    plain, _ = A.compute_policy_loss(ctx.replace(advantages=ctx.advantages * weights), "ppo_clip",
                                     loss_config=algorithm.loss.settings)
    assert torch.equal(got, want) and torch.allclose(got, plain, rtol=1e-6)


def test_the_docs_hook_example_is_the_tested_file():
    """docs/algorithms.md shows examples/hooks/entropy_boost.{py,yaml} verbatim (the two-node launch test trains
    with them), so the documented hook is the one that runs."""
    docs = (REPO / "docs/algorithms.md").read_text()
    for name in ("entropy_boost.py", "entropy_boost.yaml"):
        assert (REPO / "examples/hooks" / name).read_text().strip() in docs, name


def test_algorithm_library_has_no_import_circle():
    """Every import inside megatron_a3po/algorithms (module level or inside functions) forms an acyclic graph."""
    package = REPO / "megatron_a3po/algorithms"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_a3po.algorithms."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps - {"__init__"}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import circle: {' -> '.join(trail + [module])}")
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for dep in graph[module]:
            visit(dep, trail + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])
    assert "registry" not in graph["losses"] and graph["algorithm"] >= {"registry", "losses"}
