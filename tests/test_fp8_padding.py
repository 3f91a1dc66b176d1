"""FP8 and the token dimension (issue 24, item 4): every micro-batch the trainer builds under --fp8-format passes
Transformer Engine's shape rules, the padding is counted in train/computed_tokens, and budgets that cannot hold
are refused at validation.

TE is not installed here, so its rule is reproduced as a predicate (`te_fp8_accepts`), from TE 2.20's source:
- transformer_engine/pytorch/utils.py `assert_dim_for_fp8_exec`: a linear layer's input, as the rank holds it,
  needs prod(shape[:-1]) % 8 == 0 (ValueError otherwise). Under sequence parallelism a column-parallel layer
  (module/linear.py, layernorm_linear.py, layernorm_mlp.py) holds its rank's shard of T / TP tokens before the
  all-gather; a row-parallel layer holds all T tokens.
- transformer_engine/common/gemm/cublaslt_gemm.cu `CanonicalizeGemmInput`: an FP8 GEMM operand's leading
  dimension must be a multiple of 16 ("Caller must pad."); the weight-gradient GEMM dW = dY^T X (linear.py,
  layout "NT") contracts over the gathered T tokens, so T % 16 == 0 (per-tensor and block scaling alike).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from megatron_a3po import config as C
from megatron_a3po import packing
from megatron_a3po.experience import pack_rows
from megatron_a3po.model_runner import model_width

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-math-7b_a3po.yaml"


def te_fp8_accepts(rows: int, width: int, tp: int, sequence_parallel: bool) -> bool:
    """Whether TE's FP8 linear layers accept a micro-batch of `rows` x `width` tokens (a pack: rows=1)."""
    if sequence_parallel and width % tp:  # megatron scatters the sequence dim over the TP ranks
        return False
    tokens = rows * width
    shard = tokens // tp if sequence_parallel else tokens
    return shard % 8 == 0 and tokens % 8 == 0 and tokens % 16 == 0


def _paper_cfg(tp: int, recipe: str | None) -> C.Config:
    cfg = C.from_dict(C.load_yaml(PAPER_CONFIG), source=str(PAPER_CONFIG))
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.model.fp8_format, cfg.model.fp8_recipe = ("e4m3", recipe) if recipe else (None, "delayed")
    return cfg


def _paper_lengths(cfg: C.Config, rows: int = 512, seed: int = 0) -> list[int]:
    """Sequence lengths (prompt + response - 1) as a math RL step produces them: short prompts, long-tailed
    responses, some truncated at the limit."""
    rng = random.Random(seed)
    rl = cfg.rl
    out = []
    for _ in range(rows):
        prompt = rng.randint(40, min(400, rl.max_prompt_length))
        response = min(rl.max_response_length, int(rng.lognormvariate(6.5, 0.8)) + 1)
        out.append(prompt + response - 1)
    return out


def _batching(cfg: C.Config, packed: bool = True) -> packing.Batching:
    t = cfg.training  # as trainer.RLTrainer builds it
    return packing.Batching(micro_batch_size=t.micro_batch_size, max_tokens=t.max_tokens_per_gpu or None if packed
                            else None, logprob_max_tokens=t.log_probs_max_tokens_per_gpu or None if packed else None,
                            multiple=packing.token_multiple_of(cfg), cost=packing.CostModel.for_model(3584, 18944))


def _packs(plans, lengths):
    """Every pack of one step (old-log-prob pass and mini-batches), built by experience.pack_rows from real rows."""
    width = max(lengths)
    tokens = torch.randint(1, 1000, (len(lengths), width))
    for plan in plans:
        for kind, micro_batches in [("logprob", plan.logprob_pass)] + [("train", m) for m in plan.mini_batches]:
            for micro in micro_batches.rows:
                rows = [plan.rows[p] for p in micro]
                pack = pack_rows(tokens[rows], tokens[rows], [lengths[r] for r in rows], micro_batches.multiple)
                yield kind, pack["tokens"].shape, sum(lengths[r] for r in rows)


# ---- the rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", packing.FP8_RECIPES)
def test_token_multiple_is_the_smallest_length_te_accepts(recipe):
    for tp in range(1, 9):
        for sp in ((False, True) if tp > 1 else (False,)):
            multiple = packing.token_multiple(tp, sp, recipe)
            accepted = [n for n in range(1, 1025) if te_fp8_accepts(1, n, tp, sp)]
            assert accepted[0] == multiple and accepted == list(range(multiple, 1025, multiple)), (tp, sp)
            assert multiple % (tp if sp else 1) == 0
    assert [packing.token_multiple(tp, True, recipe) for tp in (2, 4, 8)] == [16, 32, 64]
    assert packing.token_multiple(8, False, recipe) == 16


def test_without_fp8_the_multiple_is_tp_under_sequence_parallelism_only():
    assert packing.token_multiple(4, True) == 4 and packing.token_multiple(4, False) == 1
    with pytest.raises(ValueError, match="no token rule for FP8 recipe 'mxfp8'"):
        packing.token_multiple(2, True, "mxfp8")


# ---- plans made under FP8 flags ----------------------------------------------------------------------------


def test_tp_only_padding_breaks_te_rule():
    """What the trainer built before the fix (packs padded to a multiple of TP): TE would raise on some pack."""
    cfg = _paper_cfg(2, "delayed")
    lengths = _paper_lengths(cfg)
    before = packing.Batching(micro_batch_size=1, max_tokens=16384, logprob_max_tokens=32768, multiple=2,
                              cost=packing.CostModel.for_model(3584, 18944))
    plans = before.plan(lengths, 256, 8)
    bad = [shape for _, shape, _ in _packs(plans, lengths) if not te_fp8_accepts(shape[0], shape[1], 2, True)]
    assert bad, "expected packs whose length is not a multiple of 16"


@pytest.mark.parametrize("tp,recipe", [(2, "delayed"), (2, "blockwise"), (4, "tensorwise"), (8, "delayed")])
def test_every_pack_under_fp8_passes_te_and_is_counted(tp, recipe):
    cfg = _paper_cfg(tp, recipe)
    assert cfg.parallel.sequence_parallel
    lengths = _paper_lengths(cfg, seed=tp)
    batching = _batching(cfg)
    mini_rows = 256
    plans = batching.plan(lengths, mini_rows, 16 // tp)
    train_computed = padded_any = 0
    for kind, shape, real in _packs(plans, lengths):
        assert shape[0] == 1 and te_fp8_accepts(1, shape[1], tp, True), (kind, shape)
        budget = cfg.training.max_tokens_per_gpu if kind == "train" else cfg.training.log_probs_max_tokens_per_gpu
        assert real <= shape[1] <= budget
        padded_any |= shape[1] > real
        if kind == "train":
            train_computed += shape[1]
    assert padded_any  # the lengths do need padding: the rule is exercised
    metrics = packing.plan_metrics(plans, lengths, max(lengths), batching)
    assert metrics["train/computed_tokens"] == train_computed > metrics["train/real_tokens"] == sum(lengths)


def test_padded_micro_batches_under_fp8_pass_te_and_are_counted():
    cfg = _paper_cfg(2, "delayed")
    lengths = _paper_lengths(cfg, rows=64)
    width = max(lengths)  # the rows' stored width (T - 1)
    batching = _batching(cfg, packed=False)
    multiple = packing.token_multiple_of(cfg)
    plans = batching.plan(lengths, 32, 8)
    computed = 0
    for plan in plans:
        for micro_batches in [plan.logprob_pass, *plan.mini_batches]:
            assert not micro_batches.packed and micro_batches.multiple == multiple
            for micro in micro_batches.rows:  # model_runner pads every padded micro-batch to model_width
                assert te_fp8_accepts(len(micro), model_width(width, multiple), 2, True), (len(micro), width)
        computed += sum(len(m) * model_width(width, multiple) for mb in plan.mini_batches for m in mb.rows)
    assert not te_fp8_accepts(1, width, 2, True)  # the stored width alone would not do
    assert packing.plan_metrics(plans, lengths, width, batching)["train/computed_tokens"] == computed


# ---- refusals ----------------------------------------------------------------------------------------------


def _validate(flags: list[str]):
    cfg, _ = C.parse_args(["--tiny-model", "qwen2", "--tensor-model-parallel-size", "8", "--sequence-parallel",
                           "--max-prompt-length", "1000", "--max-response-length", "3000", "--bf16", *flags])
    C.validate(cfg, world_size=16)


@pytest.mark.parametrize("flags,message", [
    (["--max-tokens-per-gpu", "4000"],  # 3999 rounds to 4000 for TP alone, to 4032 for FP8 at TP=8
     r"--max-tokens-per-gpu 4000 cannot hold the longest sequence \(4032 tokens.*a multiple of 64, FP8's token rule "
     r"at TP=8 with --sequence-parallel\); raise it to at least 4032"),
    (["--max-tokens-per-gpu", "16400"],
     r"--max-tokens-per-gpu 16400 is not a multiple of 64, .*set it to 16384 or 16448"),
    (["--max-tokens-per-gpu", "16384", "--log-probs-max-tokens-per-gpu", "32770"],
     r"--log-probs-max-tokens-per-gpu 32770 is not a multiple of 64"),
])
def test_fp8_budgets_that_cannot_hold_are_refused(flags, message):
    with pytest.raises(C.ConfigError, match=message):
        _validate([*flags, "--fp8-format", "e4m3"])


def test_fp8_budget_checks_run_before_the_gpu_check():
    # A valid budget gets past the packing rules to the check that this CPU box has no TE ...
    with pytest.raises(C.ConfigError, match="--fp8-format needs Transformer Engine and a CUDA GPU"):
        _validate(["--max-tokens-per-gpu", "16384", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"])
    # ... and without FP8 the budget refused above for FP8 is fine (TP's multiple only).
    _validate(["--max-tokens-per-gpu", "4000"])
