"""`RLTrainer.step` in this process with only the rollout engine faked: the real tiny Megatron policy (world size 1,
gloo), the real synthetic arithmetic data and reward, the real metrics logger. A failing step names its RL step
and the phase it failed in. (vLLM end to end: test_train_layouts.py, test_rollout_refit.py and the other
multi-process tests.)

The fake engine answers every prompt "a+b=" with one correct response (reward 1) and one wrong one (reward 0), so
each group has a positive and a negative advantage; its token ids and log-probs come from a seeded generator.
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch

from megatron_a3po.rollout.sampling import RolloutBatch, SamplingConfig
from megatron_a3po.rollout.scripted import arithmetic_batch
from helpers import REPO

PROMPTS, N = 2, 2  # rollout batch: 2 prompts x 2 responses
FLAGS = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2", "--tensor-model-parallel-size", "1",
         "--rollout-batch-size", str(PROMPTS), "--rollout-n", str(N), "--ppo-mini-batch-size", str(PROMPTS),
         "--micro-batch-size", "4", "--max-prompt-length", "8", "--max-response-length", "4", "--train-steps", "3",
         "--eval-prompts", "2", "--eval-n", "2", "--eval-interval", "0"]


class FakeEngine:
    """The methods of RolloutEngine that `RLTrainer.step` calls (generate, sleep, refit), without vLLM."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer, self.generator = tokenizer, torch.Generator().manual_seed(seed)
        self.refits: list[dict[str, torch.Tensor]] = []  # the weights of every refit, by HF name
        self.sleeps = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, pad_id: int, step: int = 0,
                 round: int = 0, score=None) -> RolloutBatch:
        """Per prompt: the correct answer, then wrong ones (random digits) up to `sampling.n`, each ended by EOS.
        Scored through `score` as the real engine does: the rewards travel with the batch."""
        return arithmetic_batch(self.tokenizer, prompts, sampling.n, self.generator, pad_id, score)

    def sleep(self, keep_weights: bool = False) -> None:
        self.sleeps += 1

    def refit(self, weights) -> None:
        self.refits.append({name: t.detach().clone() for name, t in weights})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Process groups (1 rank, gloo), the policy, data and reward: built once; torn down after the module."""
    from megatron_a3po import config as C
    from megatron_a3po import parallel
    from megatron_a3po.data import PromptDataset, PromptSampler, check_tokenizer_fits
    from megatron_a3po.metrics import MetricsLogger
    from megatron_a3po.model_runner import PolicyModel
    from megatron_a3po.models import families, tiny
    from megatron_a3po.rewards import get_reward_fn, make_arithmetic_dataset

    out = tmp_path_factory.mktemp("trainer_step")
    cfg, _ = C.parse_args([*FLAGS, "--output-dir", str(out)])
    arch = families.arch_from_hf_config(tiny.hf_config(cfg.model.tiny_model).to_dict())
    tokenizer = tiny.build_tokenizer()
    check_tokenizer_fits(tokenizer, arch.vocab_size)
    rl, seed = cfg.rl, cfg.training.seed
    # The job's synthetic data (dataset synthetic:arithmetic:1), fewer rows.
    data = {name: PromptDataset.from_dicts(make_arithmetic_dataset(rows, 1, seed=seed + offset), tokenizer,
                                           max_prompt_length=rl.max_prompt_length, raw_prompt=rl.raw_prompt)
            for name, rows, offset in (("train_data", 64, 0), ("eval_data", rl.eval_prompts, 99991))}
    with pytest.MonkeyPatch.context() as env:  # the torchrun variables of a 1-rank job, restored afterwards
        env.setenv("RANK", "0"), env.setenv("LOCAL_RANK", "0"), env.setenv("WORLD_SIZE", "1")
        env.setenv("MASTER_ADDR", "127.0.0.1"), env.setenv("MASTER_PORT", "0")  # one rank: its store binds a port at once
        env.setenv("A3PO_PROGRESS", "0"), env.delenv("A3PO_EMULATE_CUDA", raising=False)
        parallel.init_model_parallel(parallel.ParallelSizes(), seed=seed)
        try:
            yield dict(cfg=cfg, policy=PolicyModel(cfg, arch), tokenizer=tokenizer, **data,
                       sampler=PromptSampler(len(data["train_data"]), seed=seed),
                       reward_fn=get_reward_fn(rl.reward), logger=MetricsLogger(str(out), cfg.to_dict()), out=out)
        finally:
            parallel.destroy()


def make_trainer(parts, engine: FakeEngine):
    from megatron_a3po.trainer import RLTrainer

    return RLTrainer(parts["cfg"], policy=parts["policy"], engine=engine, tokenizer=parts["tokenizer"],
                     train_data=parts["train_data"], eval_data=parts["eval_data"], sampler=parts["sampler"],
                     reward_fn=parts["reward_fn"], logger=parts["logger"])


def test_one_step_trains_and_refits_the_engine(parts):
    import transformers

    from megatron_a3po.metrics import read_jsonl
    from megatron_a3po.models import tiny

    engine = FakeEngine(parts["tokenizer"])
    trainer = make_trainer(parts, engine)
    before = {name: t.clone() for name, t in parts["policy"].hf_state()}
    metrics = trainer.step(1)
    trainer.logger.log(1, metrics)  # plain numbers, as fit() logs them

    assert math.isfinite(metrics["loss/pg_loss"]) and metrics["loss/pg_loss"] != 0.0
    assert math.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0
    assert metrics["train/skipped_updates"] == 0.0
    # As constructed: per prompt one correct and one wrong response -> one positive and one negative advantage.
    assert metrics["pos/count"] == PROMPTS and metrics["neg/count"] == PROMPTS
    assert metrics["reward/accuracy"] == 0.5 and metrics[f"buckets/1_of_{N}"] == 1.0
    assert metrics["pos/advantage_mass"] > 0 > metrics["neg/advantage_mass"]
    assert math.isfinite(metrics["entropy"]) and math.isfinite(metrics["mismatch/logp_abs_mean"])
    # The task's labels: every scripted answer is stated directly, half of them right.
    assert (metrics["task/direct_share"], metrics["task/direct_accuracy"]) == (1.0, 0.5)
    # What A3PO reweighted (the default algorithm), and the step-1 token histograms: every response token once.
    assert 0 < metrics["a3po/pos_selected_prob_mean"] <= 1 and metrics["a3po/neg_selected_one_minus_p_sum"] >= 0
    for side in ("pos", "neg"):
        counts = sum(v for k, v in metrics.items() if k.startswith(f"tokprob/{side}/"))
        assert counts == metrics[f"{side}/count"] * metrics[f"{side}/length"] > 0, side
    for phase in ("rollout", "reward", "old_logprobs", "train", "refit"):
        assert metrics[f"time/{phase}"] >= 0.0, phase
    assert engine.sleeps == 1

    after = {name: t.clone() for name, t in parts["policy"].hf_state()}
    assert after.keys() == before.keys() and "model.embed_tokens.weight" in after
    changed = [name for name in after if not torch.equal(after[name], before[name])]
    assert len(changed) == len(after), sorted(set(after) - set(changed))  # Adam moves every weight
    # The refit at the end of the step carried every weight of the updated policy, by its HF name.
    assert len(engine.refits) == 1
    refit = engine.refits[0]
    assert refit.keys() == after.keys()
    assert all(torch.equal(refit[name], after[name]) for name in after)
    # ... named and shaped as the Hugging Face model of the same config (what vLLM loads).
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(tiny.hf_config(parts["cfg"].model.tiny_model))
    assert {name: tuple(t.shape) for name, t in refit.items()} == \
        {name: tuple(p.shape) for name, p in hf_model.named_parameters()}

    (logged,) = read_jsonl(parts["out"] / "metrics.jsonl")
    assert logged["step"] == 1 and logged["pos/count"] == PROMPTS


MESSAGES = {"rollout": "engine down", "reward": "verifier crashed", "old_logprobs": "forward failed",
            "train": "forward failed", "refit": "refit failed"}


def _raise(phase: str):
    def fail(*args, **kwargs):
        raise RuntimeError(MESSAGES[phase])

    return fail


@pytest.mark.parametrize("phase", list(MESSAGES))
def test_a_failing_phase_names_the_step_and_the_phase(parts, phase, monkeypatch):
    engine = FakeEngine(parts["tokenizer"])
    trainer = make_trainer(parts, engine)
    policy = parts["policy"]
    if phase == "rollout":
        monkeypatch.setattr(engine, "generate", _raise(phase))
    elif phase == "reward":  # (the real engine re-raises a scoring failure as RewardError: "phase rollout")
        monkeypatch.setattr(trainer.reward_fn, "batch", _raise(phase))
    elif phase == "refit":
        monkeypatch.setattr(engine, "refit", _raise(phase))
    else:  # the policy's forward: forward-only for the old log-probs, with backward in training
        forward_backward = policy.forward_backward

        def failing(micro_batches, loss_fn, *, forward_only=False):
            if forward_only == (phase == "old_logprobs"):
                raise RuntimeError(MESSAGES[phase])
            return forward_backward(micro_batches, loss_fn, forward_only=forward_only)

        monkeypatch.setattr(policy, "forward_backward", failing)

    with pytest.raises(RuntimeError, match=rf"RL step 2, phase {phase}$") as caught:
        trainer.step(2)
    # The original exception (type, message), with a note: its traceback ends in "RL step 2, phase <phase>".
    assert caught.value.__notes__ == [f"RL step 2, phase {phase}"]
    printed = "".join(traceback.format_exception(caught.value)).splitlines()
    assert printed[-2:] == [f"RuntimeError: {MESSAGES[phase]}", f"RL step 2, phase {phase}"], printed[-3:]


class EventEngine(FakeEngine):
    """FakeEngine that also records the order of its calls, and the trainer's saves (issue 24, item 2)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.events: list[str] = []

    def generate(self, *args, **kwargs):
        self.events.append("generate")
        return super().generate(*args, **kwargs)

    def sleep(self, keep_weights: bool = False) -> None:
        self.events.append("sleep")
        super().sleep(keep_weights)

    def refit(self, weights) -> None:
        self.events.append("refit")  # the real engine's refit wakes vLLM first
        super().refit(weights)


def test_checkpoints_are_saved_while_vllm_sleeps(parts, tmp_path):
    """fit() saves with vLLM asleep (the save's staging must not meet vLLM's weights and KV cache), and a run that
    goes on refits vLLM (which wakes it: a level-2 sleep dropped its weights) before it generates again. The real
    Checkpointer writes the checkpoints; the engine only records."""
    import copy

    from megatron_a3po.checkpointing import Checkpointer
    from megatron_a3po.models import tiny
    from megatron_a3po.trainer import RLTrainer

    cfg = copy.deepcopy(parts["cfg"])
    cfg.training.save, cfg.training.save_interval, cfg.rl.train_steps = str(tmp_path / "ckpt"), 1, 2
    engine = EventEngine(parts["tokenizer"])
    tokenizer_dir = tmp_path / "tokenizer"
    parts["tokenizer"].save_pretrained(tokenizer_dir)

    class Recording(Checkpointer):
        def save(self, step, extra=None):
            engine.events.append(f"save {step}")
            return super().save(step, extra)

    checkpointer = Recording(cfg, parts["policy"], parts["sampler"], tiny.hf_config(cfg.model.tiny_model).to_dict(),
                             tokenizer_dir)
    trainer = RLTrainer(cfg, policy=parts["policy"], engine=engine, tokenizer=parts["tokenizer"],
                        train_data=parts["train_data"], eval_data=parts["eval_data"], sampler=parts["sampler"],
                        reward_fn=parts["reward_fn"], logger=parts["logger"], checkpointer=checkpointer)
    trainer.fit()
    events = engine.events
    saves = [i for i, e in enumerate(events) if e.startswith("save")]
    assert [events[i] for i in saves] == ["save 1", "save 2"], events  # --save-interval 1
    for i in saves:
        assert events[i - 1] == "sleep", events  # nothing woke vLLM between its sleep and the save
        assert events[i + 1] == "refit", events  # vLLM gets its weights back before the next generate
    assert (tmp_path / "ckpt" / "step_000002").is_dir()
