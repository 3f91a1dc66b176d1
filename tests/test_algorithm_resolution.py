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
])
def test_impossible_combinations_are_refused(flags, message):
    cfg, _ = C.parse_args([*BASE, *flags])
    with pytest.raises(C.ConfigError) as err:
        cfg = resolve_job(cfg, 2).cfg
    assert message in str(err.value)


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
