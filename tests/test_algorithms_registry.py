"""Registry names, `module:function` user hooks and their errors."""

from __future__ import annotations

import pytest
import torch

from megatron_a3po.algorithms import AlgoContext, compute_policy_loss, get_advantage_fn, get_policy_loss, get_shaper, names, register
from megatron_a3po.algorithms import registry, shaping


def test_registered_names():
    assert names("advantage") == ["dr_grpo", "grpo", "nsr", "polarity_weighted", "psr",
                                  "reinforce_plus_plus_baseline", "rloo", "w_reinforce"]
    assert names("shaper") == ["a3po", "fork_tokens", "token_weighted"]
    assert names("policy_loss") == ["clip_cov", "gspo", "kl_cov", "lp_reg", "ppo_clip"]


@pytest.mark.parametrize("getter, kind", [(get_advantage_fn, "advantage"), (get_shaper, "shaper"), (get_policy_loss, "policy_loss")])
def test_unknown_name_raises_with_the_fix(getter, kind):
    with pytest.raises(ValueError, match=r"unknown .*'nope'.*registered.*module:function"):
        getter("nope")
    with pytest.raises(ValueError, match="cannot import"):
        getter("no_such_pkg_xyz.mod:fn")
    with pytest.raises(ValueError, match="no attribute"):
        getter("megatron_a3po.algorithms.shaping:does_not_exist")
    with pytest.raises(ValueError, match="module:function"):
        getter(":fn")


def test_module_function_hook_resolves_to_the_object():
    assert get_shaper("megatron_a3po.algorithms.shaping:a3po") is shaping.a3po


def halve_shaper(ctx):
    return torch.full(ctx.response_mask.shape, 0.5)


def bad_phase_shaper(ctx):
    return torch.ones(ctx.response_mask.shape)


bad_phase_shaper.phase = "epoch"


def my_loss(ctx):
    """User loss with its own config: -A * logp * scale."""
    return -ctx.advantages * ctx.logprobs * ctx.config["scale"], {}


def test_user_hooks_run_through_the_same_paths():
    shaper = get_shaper(f"{__name__}:halve_shaper")
    assert registry.shaper_phase(shaper) == "step"
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert torch.equal(shaper(AlgoContext(response_mask=mask)), torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="phase"):
        get_shaper(f"{__name__}:bad_phase_shaper")
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ctx = AlgoContext(response_mask=mask, advantages=torch.tensor([[1.0, -1.0]]), logprobs=logp,
                      old_logprobs=logp.detach())
    loss, _ = compute_policy_loss(ctx, f"{__name__}:my_loss", loss_config={"scale": 3.0})
    assert float(loss.detach()) == pytest.approx((3.0 * 1.0 - 3.0 * 2.0) / 2)


def test_register_decorator_and_duplicates():
    @register("shaper", "unit_test_ones")
    def ones(ctx):
        return torch.ones(ctx.response_mask.shape)

    try:
        assert get_shaper("unit_test_ones") is ones
        with pytest.raises(ValueError, match="already registered"):
            register("shaper", "unit_test_ones", halve_shaper)
        with pytest.raises(ValueError, match="kind"):
            register("optimizer", "x", halve_shaper)
    finally:
        registry._REGISTRIES["shaper"].pop("unit_test_ones")


def test_algorithms_package_does_not_import_megatron():
    import subprocess
    import sys

    code = ("import sys, megatron_a3po.algorithms, megatron_a3po.logprobs; "
            "bad = [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
