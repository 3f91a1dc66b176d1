"""The RL step, top to bottom:

rollout (vLLM) -> reward -> outcome advantages -> old log-probs + entropy (Megatron) [+ reference log-probs]
-> token shaping (A3PO ...) and rollout-mismatch correction -> mini-batch PPO updates through Megatron's
pipeline schedule with the policy-loss hook -> refit -> metrics. An exception escaping a timed phase carries a
note naming the RL step and the phase (`metrics.PhaseTimer`).

The algorithm is resolved once (`rl_config.resolve_algorithm`) into one object that says what to compute;
everything else (parallel state, the model, vLLM, algorithms, data, metrics) lives in its own module.
"""

from __future__ import annotations

import hashlib
import itertools

import torch

from megatron_a3po import metrics as M
from megatron_a3po import packing, parallel, platform, token_stats
from megatron_a3po.algorithms import is_correct
from megatron_a3po.guards import injected_nan_step
from megatron_a3po.data import DynamicSampler
from megatron_a3po.evaluation.runner import evaluate_items
from megatron_a3po.experience import (LogprobSettings, algo_context, build_experience, compute_old_logprobs,
                                      compute_ref_logprobs, sequence_lengths, train_mini_batch)
from megatron_a3po.rewards.math_reward import overlong_penalty
from megatron_a3po.rl_config import resolve_algorithm
from megatron_a3po.rollout.sampling import SamplingConfig, select_groups


class RLTrainer:
    def __init__(self, cfg, *, policy, engine, tokenizer, train_data, eval_data, sampler, reward_fn, logger,
                 start_step: int = 1, on_step_end=None, checkpointer=None, guard=None,
                 val_before: float | None = None, reference=None):
        self.cfg, self.rl = cfg, cfg.rl
        self.policy, self.engine, self.tokenizer = policy, engine, tokenizer
        self.train_data, self.eval_data, self.sampler, self.reward_fn = train_data, eval_data, sampler, reward_fn
        self.logger, self.start_step, self.on_step_end = logger, start_step, on_step_end
        # checkpointing.Checkpointer / guards.RunGuard (None: no saving / no stop conditions); val_before on resume
        self.checkpointer, self.guard, self.val_before = checkpointer, guard, val_before
        self.stop_reason: str | None = None  # set when fit() stops early: "preempted" | "nonfinite"
        self.nan_steps = injected_nan_step() or set()  # test hook
        self.algorithm = resolve_algorithm(self.rl)
        self.reference = reference  # frozen PolicyModel for the KL penalty (None unless --kl-coef > 0)
        if ("ref_logprobs" in self.algorithm.needs) != (reference is not None):
            raise ValueError("RLTrainer needs a reference model exactly when the algorithm needs ref_logprobs "
                             f"(--kl-coef > 0); algorithm: {self.algorithm.describe()}")
        self.offload_train = cfg.training.offload_train_during_rollout
        self.logprob_settings = LogprobSettings(temperature=self.rl.rollout_temperature,
                                                vocab_size=policy.arch.vocab_size, minp_kappa=self.algorithm.minp_kappa)
        t = cfg.training
        self.batching = packing.Batching(
            micro_batch_size=t.micro_batch_size, max_tokens=t.max_tokens_per_gpu or None,
            logprob_max_tokens=t.log_probs_max_tokens_per_gpu or None,
            multiple=packing.token_multiple_of(cfg),  # TP under SP, FP8's rule: one function for all
            cost=packing.CostModel.for_model(policy.arch.hidden_size, policy.arch.ffn_hidden_size))
        self.sampling = SamplingConfig(n=self.rl.rollout_n, temperature=self.rl.rollout_temperature,
                                       top_p=self.rl.rollout_top_p, top_k=self.rl.rollout_top_k,
                                       max_new_tokens=self.rl.max_response_length, seed=cfg.training.seed,
                                       stop=[])

    # ---- the run ----------------------------------------------------------------------------------------------

    def fit(self) -> tuple[float, float | None]:
        """Refit vLLM from Megatron, evaluate, train `train_steps` RL steps (checkpointing), evaluate again.

        Returns (val before, val after); after is None when a run guard stopped training (see stop_reason).
        """
        self.engine.refit(self.policy.hf_state())
        before = self.val_before if self.val_before is not None else \
            self.evaluate(step=self.start_step - 1)["val/avg@k"]
        steps = range(self.start_step, self.rl.train_steps + 1)
        for step in M.progress(steps, desc="RL steps", leave=True):
            metrics = self.step(step)
            if self.rl.eval_interval and step % self.rl.eval_interval == 0 and step != self.rl.train_steps:
                metrics.update(self.evaluate(step, log=False))
            self.logger.log(step, metrics)
            self.stop_reason = self.guard.check(step, metrics) if self.guard is not None else None
            # No checkpoint when updates keep failing: the last good one stays the newest.
            if self.checkpointer is not None and self.stop_reason != "nonfinite" and (
                    self.checkpointer.due(step) or step == self.rl.train_steps or self.stop_reason == "preempted"):
                # vLLM (woken by this step's refit) hands its device memory back first: the save stages optimizer
                # state on the host and must not meet vLLM's weights and KV cache (issue 24, item 2). A level-2
                # sleep drops vLLM's weights, so a run that goes on refits them (which wakes vLLM).
                self.engine.sleep()
                self.checkpointer.save(step, extra={"val_before": before})
                if self.stop_reason is None:
                    self.engine.refit(self.policy.hf_state())
            if self.on_step_end is not None:
                self.on_step_end(step, metrics)
            if self.stop_reason is not None:
                return before, None
        after = self.evaluate(step=self.rl.train_steps)
        return before, after["val/avg@k"]

    def step(self, step: int) -> dict:
        timer = M.PhaseTimer(step)  # a failure inside a timed phase names the step and the phase
        syncs_before = platform.host_syncs()  # None unless CUDA emulation counts them
        # 1-2. Rollout (vLLM, n responses per prompt; every rank ends up with the whole batch) and verifiable
        # outcome reward; with dynamic sampling, only prompt groups whose rewards vary (more rounds if needed).
        self.to_rollout()  # --offload-train-during-rollout: grads and optimizer state off the device first
        batch, rewards, sampling_metrics = self.collect_rollouts(step, timer)
        # vLLM sleeps (level 2: refit rewrites its weights; level 1 when no update, hence no refit, follows) and
        # the training memory comes back
        self.to_training(keep_weights=batch is None)
        if batch is None:  # dynamic sampling found no full mini-batch of informative groups: nothing to train on
            return {**sampling_metrics, **timer.as_metrics(), "train/skipped_updates": 0.0}
        # 3. Outcome advantages (GRPO group normalisation ...); polarity = sign(A). PSR / NSR / W-REINFORCE also
        # read the verifier's verdict (batch.rewards: before the overlong penalty).
        adv = self.algorithm.advantages(rewards, batch.response_mask.bool(), self.rl.rollout_n,
                                        correct=is_correct(batch.rewards))
        # This DP rank's rows and micro-batches: fixed-size padded ones, or token-budget packs with the rows of
        # each mini-batch balanced over DP ranks (every rank computes the same plans from the same batch).
        lengths = sequence_lengths(batch)
        plans = self.batching.plan(lengths, self.rl.ppo_mini_batch_size * self.rl.rollout_n, parallel.dp_size())
        mine = plans[parallel.dp_rank()]
        exp = build_experience(batch, rewards, adv, torch.tensor(mine.rows)).to(platform.device())
        # 4. Old-policy log-probs and entropy (Megatron forward, TP-aware) on the last pipeline stage, or vLLM's
        # log-probs as pi_old (--use-rollout-logprobs: one forward fewer, no old entropy, no mismatch measured);
        # the frozen reference policy's log-probs for the KL penalty.
        if self.rl.use_rollout_logprobs:
            exp.old_logprobs, on_last_stage = exp.rollout_logprobs.float(), parallel.is_last_stage()
            timer.skipped("old_logprobs")
        else:
            with timer("old_logprobs"):
                on_last_stage = compute_old_logprobs(self.policy, exp, mine.logprob_pass, self.logprob_settings)
        if self.reference is not None:
            with timer("ref_logprobs"):
                compute_ref_logprobs(self.reference, exp, mine.logprob_pass, self.logprob_settings)
        # 5. Once per step, before the mini-batch split: token shaping (A3PO: Â = A · w), then the rollout-mismatch
        # correction (Â · w_IS; rejected tokens leave the loss).
        weights = correction = None
        if on_last_stage:
            ctx = algo_context(vars(exp), step=step, total_steps=self.rl.train_steps)
            weights, correction = self.algorithm.shape(ctx), self.algorithm.correct(ctx)
            if weights is not None:
                exp.advantages = exp.advantages * weights
            if correction is not None:
                exp.advantages = exp.advantages * correction.weights
                exp.loss_mask = exp.loss_mask & ~correction.rejected
        if step in self.nan_steps:  # test hook (A3PO_TEST_INJECT_NAN_STEP): a NaN loss and NaN gradients
            exp.advantages = exp.advantages * float("nan")
        # 6. Mini-batch updates through Megatron's pipeline schedule with the policy-loss hook.
        with timer("train"):
            minis = mine.mini_batches * self.rl.ppo_epochs
            updates, loss_outputs = [], []
            for mini in M.progress(minis, desc=f"step {step} updates"):
                stats, outs = train_mini_batch(self.policy, exp, mini, self.logprob_settings, self.algorithm, step,
                                               self.rl.train_steps, max_len=self.rl.max_response_length)
                updates.append(stats)
                loss_outputs += outs
        # 7. Refit: stream the updated weights into vLLM through the shared HF mapping.
        with timer("refit"):
            self.engine.refit(self.policy.hf_state())
        # 8. Metrics (polarity-split; what the shaper did to which tokens), reduced over all ranks; the task's
        # per-response labels (level 6: direct or worked answers).
        shaper = self.algorithm.shaper.label if self.algorithm.shaper else "shaper"
        local = {**M.step_statistics(exp, weights, loss_outputs, len(updates), shaper=shaper, correction=correction,
                                     mismatch=not self.rl.use_rollout_logprobs),
                 **token_stats.shaping_statistics(exp, weights, shaper, step)} \
            if on_last_stage and parallel.tp_rank() == 0 else {}
        metrics = M.reduce_statistics(local)
        metrics.update(M.batch_statistics(batch, rewards, self.rl.rollout_n, self.overlong_penalties(batch)))
        metrics.update(M.task_statistics(self.task_labels(batch), is_correct(batch.rewards)))
        metrics.update(M.update_statistics(updates))
        metrics.update(packing.plan_metrics(plans, lengths, exp.tokens.shape[1], self.batching))
        metrics.update(sampling_metrics)
        metrics.update(timer.as_metrics())
        if syncs_before is not None:  # each device-to-host sync stalls a GPU stream
            metrics["sync/host_syncs"] = float(platform.host_syncs() - syncs_before)
        metrics.update(self.algorithm.metrics(step))
        return metrics

    def collect_rollouts(self, step: int, timer) -> tuple:
        """(batch, rewards, metrics) of this step's training prompts.

        Dynamic sampling (DAPO): groups whose n rewards are all equal have zero advantage and only dilute the
        batch, so rounds of `rollout_batch_size` prompts are generated until that many informative groups are
        kept (at most `max_num_gen_batches` rounds). A short batch trains on whole mini-batches only; None when
        not even one was kept.
        """
        n, pad = self.rl.rollout_n, self.tokenizer.pad_token_id
        keeper = DynamicSampler(self.rl.rollout_batch_size, self.rl.max_num_gen_batches) \
            if self.rl.dynamic_sampling else None
        generated = correct = 0
        drawn = hashlib.sha256()  # which prompts this step drew: runs that must see the same data can compare it
        for round_ in itertools.count():
            indices = self.sampler.next_indices(self.rl.rollout_batch_size)
            drawn.update(repr(list(indices)).encode())
            items = [self.train_data[i] for i in indices]

            def score(prompt_indices: list[int], responses: list[list[int]]) -> list[float]:
                with timer("reward"):  # each rank scores its share only; the rewards come back with the batch
                    texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
                    return self.reward_fn.batch(texts, [items[i].ground_truth for i in prompt_indices])

            with timer("rollout"):
                batch = self.engine.generate([it.prompt_ids for it in items], self.sampling, pad, step=step,
                                             round=round_, score=score)
            penalties = self.overlong_penalties(batch)
            rewards = batch.rewards if penalties is None else batch.rewards + penalties
            if keeper is None:
                return batch, rewards, {"data/prompt_digest": _digest(drawn)}
            generated, correct = generated + len(rewards), correct + int(is_correct(batch.rewards).sum())
            keeper.add(rewards.view(-1, n).tolist(), [(batch, g, rewards[g * n:(g + 1) * n]) for g in range(len(items))])
            if keeper.done:
                break
        kept, stats = keeper.take()
        metrics = {f"dynamic/{k}": float(v) for k, v in stats.items()}
        metrics["dynamic/generated_accuracy"] = correct / generated
        usable = len(kept) // self.rl.ppo_mini_batch_size * self.rl.ppo_mini_batch_size
        metrics["dynamic/trained_prompts"] = float(usable)
        metrics["data/prompt_digest"] = _digest(drawn)
        if usable < len(kept) and parallel.is_rank0():
            print(f"warning: step {step}: dynamic sampling kept {len(kept)} of {self.rl.rollout_batch_size} prompt "
                  f"groups in {stats['rounds']} rounds (--max-num-gen-batches); training on {usable}. Raise "
                  "--max-num-gen-batches, or use easier/harder-balanced data", flush=True)
        if usable == 0:
            return None, None, metrics
        kept = kept[:usable]
        return (select_groups([(b, g) for b, g, _ in kept], pad), torch.cat([r for _, _, r in kept]), metrics)

    def task_labels(self, batch) -> list[str] | None:
        """The task's label of every response of the batch (None when its reward defines none)."""
        if not self.reward_fn.has_labels:
            return None
        return self.reward_fn.labels(self.tokenizer.batch_decode(batch.responses, skip_special_tokens=True))

    def overlong_penalties(self, batch) -> torch.Tensor | None:
        """DAPO's soft overlong punishment per response (added to the verifier's reward); None when off."""
        rl = self.rl
        if not rl.overlong_buffer_len:
            return None
        return torch.tensor([overlong_penalty(n, rl.max_response_length, rl.overlong_buffer_len,
                                              rl.overlong_penalty_factor) for n in batch.response_lengths.tolist()])

    # ---- memory handoff: vLLM's KV cache and Megatron's training state take turns on the device ---------------

    def to_rollout(self) -> None:
        """Before vLLM wakes its KV cache: with --offload-train-during-rollout, Megatron's grad buffers and
        optimizer state leave the device (the weights stay: refit has read them, old log-probs will)."""
        if self.offload_train:
            self.policy.offload_train_state()

    def to_training(self, keep_weights: bool = False) -> None:
        """After generation: vLLM releases its memory (see RolloutEngine.sleep), then the training state returns."""
        self.engine.sleep(keep_weights=keep_weights)
        if self.offload_train:
            self.policy.restore_train_state()

    # ---- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, step: int, log: bool = True) -> dict:
        """avg@k and pass@k on the held-out prompts with the paper's eval sampling (T=0.6, top_p=0.95), through
        the same code as `a3po eval` (the training reward decides correctness)."""
        items = [self.eval_data[i] for i in range(min(self.rl.eval_prompts, len(self.eval_data)))]
        k = self.rl.eval_n
        sampling = SamplingConfig(n=k, temperature=self.rl.eval_temperature, top_p=self.rl.eval_top_p,
                                  max_new_tokens=self.rl.max_response_length, seed=self.cfg.training.seed + 7)
        self.to_rollout()
        out = evaluate_items(self.engine, self.tokenizer, items, sampling, reward_fn=self.reward_fn,
                             step=10_000 + step)
        if self.offload_train:  # give the device back to training; no refit follows, so vLLM keeps its weights
            self.to_training(keep_weights=True)
        result = {"val/avg@k": out[f"avg@{k}"], "val/pass@k": out[f"pass@{k}"], "val/k": float(k)}
        result.update({f"val/{name}": float(v) for name, v in out.items()
                       if name.startswith(("pass@", "length_")) or name == "truncated_fraction"})
        if log:
            self.logger.log(step, result)
        return result


def _digest(hash_) -> float:
    """48 bits of a hash as a float (exact in float64, so it survives the JSON metrics row)."""
    return float(int(hash_.hexdigest()[:12], 16))
