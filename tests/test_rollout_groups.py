"""Data-parallel rollout: 2 ranks, rollout TP=1, so 2 vLLM groups each generating its share of the prompts.

References are independent of the engine: the prompts each vLLM instance was actually asked for (recorded
around `llm.generate`), Hugging Face transformers' forward (log-probs) and greedy `generate`.
"""

import math

import pytest
import torch

from megatron_a3po.spawn import run_in_ranks

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
PROMPTS = [[3, 20, 21, 22, 23], [3, 30], [3, 40, 41, 42]]  # 3 prompts over 2 groups: 2 / 1
N, MAX_NEW = 4, 6
STOP = list("abcdefghijklmnopqrstuvwxyz")  # one token each: some responses stop early, some hit the cap
GREEDY_NEW = 10


def _groups_body(hf_dir):
    from megatron_a3po.rollout.engine import RolloutEngine
    from megatron_a3po.rollout.sampling import SamplingConfig

    engine = RolloutEngine(hf_dir, rollout_tp=1, max_model_len=128, seed=0, load_format="auto")
    calls = []
    generate = engine.llm.generate

    def recording(inputs, params, **kwargs):
        outs = generate(inputs, params, **kwargs)
        calls.append(dict(prompts=[x["prompt_token_ids"] for x in inputs],
                          finish=[[(list(c.token_ids), c.finish_reason) for c in o.outputs] for o in outs]))
        return outs

    engine.llm.generate = recording
    scored = []

    def score(prompt_indices, responses):  # a deterministic reward: every rank records what it scored
        scored.extend((i, tuple(r)) for i, r in zip(prompt_indices, responses))
        return [100.0 * i + len(r) for i, r in zip(prompt_indices, responses)]

    sampled = engine.generate(PROMPTS, SamplingConfig(n=N, max_new_tokens=MAX_NEW, stop=STOP, seed=1), pad_id=0,
                              score=score)
    greedy = engine.generate(PROMPTS, SamplingConfig(n=1, temperature=0.0, max_new_tokens=GREEDY_NEW), pad_id=0)
    # The same prompt 4 times: each group gets 2 copies in one vLLM call.
    duplicates = engine.generate([[3, 20, 21]] * 4, SamplingConfig(n=2, max_new_tokens=8, seed=5), pad_id=0)

    def failing_on_rank_1(prompt_indices, responses):  # e.g. its reward workers cannot start
        if engine.group == 1:
            raise RuntimeError("reward worker failed to start")
        return [0.0] * len(responses)

    try:  # every rank must raise (before: rank 0 waited for rank 1 in the gather until the timeout)
        engine.generate(PROMPTS, SamplingConfig(n=1, max_new_tokens=2, seed=3), pad_id=0, score=failing_on_rank_1)
        failure = None
    except Exception as err:  # noqa: BLE001
        failure = f"{type(err).__name__}: {err}"
    return dict(group=engine.group, calls=calls[:3], sampled=vars(sampled), greedy=vars(greedy), scored=scored,
                duplicates=duplicates.responses, failure=failure)


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _cut_at_eos(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def groups_run(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    # init_std 0.2: peaked enough that greedy decoding does not just repeat one token, with top-2 logit gaps
    # far above float32 noise, so vLLM and transformers must agree token for token.
    hf_dir = str(write_tiny_hf_checkpoint(tmp_path_factory.mktemp("groups") / "m", "qwen2", seed=3, init_std=0.2))
    return hf_dir, run_in_ranks(_groups_body, 2, (hf_dir,), timeout=600, env=VLLM_ENV)


def test_two_rollout_groups_split_gather_and_match_hf(groups_run):
    from megatron_a3po.models.tiny import build_tokenizer

    hf_dir, results = groups_run
    tok = build_tokenizer()
    eos, stop_ids = tok.eos_token_id, set(tok.convert_tokens_to_ids(STOP))

    # Each group generated only its contiguous share (the first group takes the remainder).
    assert [r["group"] for r in results] == [0, 1]
    assert [c["prompts"] for c in results[0]["calls"][:2]] == [PROMPTS[:2], PROMPTS[:2]]  # sampled, greedy
    assert [c["prompts"] for c in results[1]["calls"][:2]] == [PROMPTS[2:], PROMPTS[2:]]

    # Rewards once: each group scored only the responses it generated (disjoint shares covering the batch), and
    # both ranks hold identical rewards, in row order, for every response.
    assert {i for i, _ in results[0]["scored"]} == {0, 1} and {i for i, _ in results[1]["scored"]} == {2}
    assert len(results[0]["scored"]) + len(results[1]["scored"]) == len(PROMPTS) * N
    b = results[0]["sampled"]
    expected = torch.tensor([100.0 * (row // N) + len(r) for row, r in enumerate(b["responses"])])
    assert torch.equal(results[0]["sampled"]["rewards"], expected)
    assert torch.equal(results[1]["sampled"]["rewards"], expected)
    assert results[0]["greedy"]["rewards"] is None  # no score callable: no rewards
    # A scoring failure on one rank stops every rank with the same error (no rank left in the gather).
    assert results[0]["failure"] == results[1]["failure"] == (
        "RewardError: reward scoring failed, so this step's rewards cannot be trusted: rank 1: RuntimeError: "
        "reward worker failed to start")

    # Both ranks hold the same gathered batch.
    for key in ("tokens", "response_mask", "rollout_logprobs", "truncated", "responses"):
        for kind in ("sampled", "greedy"):
            a, b = results[0][kind][key], results[1][kind][key]
            assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), (kind, key)

    b = results[0]["sampled"]
    assert b["tokens"].shape[0] == len(PROMPTS) * N and b["group_size"] == N
    # Row p * N + j is the j-th completion vLLM returned for prompt p, in whichever group generated it.
    generated = [c for r in results for c in r["calls"][0]["finish"]]  # group 0's prompts, then group 1's
    rows = [(p, *generated[p][j]) for p in range(len(PROMPTS)) for j in range(N)]
    for row, (p, response, finish) in enumerate(rows):
        prompt, plen, rlen = PROMPTS[p], len(PROMPTS[p]), len(response)
        toks, mask, lps = b["tokens"][row], b["response_mask"][row], b["rollout_logprobs"][row]
        assert b["responses"][row] == response
        assert toks[:plen].tolist() == prompt and toks[plen: plen + rlen].tolist() == response
        assert (toks[plen + rlen:] == 0).all()  # right padding with pad_id
        assert mask.tolist() == [0.0] * plen + [1.0] * rlen + [0.0] * (len(mask) - plen - rlen)
        assert b["prompt_lengths"][row] == plen and b["response_lengths"][row] == rlen
        assert torch.isfinite(lps).all() and (lps[mask.bool()] <= 0).all() and (lps[~mask.bool()] == 0).all()
        # Only the last token may be a stop token; truncated exactly when the cap was hit without one.
        assert not (set(response[:-1]) & (stop_ids | {eos}))
        capped = rlen == MAX_NEW and response[-1] not in stop_ids | {eos}
        assert bool(b["truncated"][row]) == capped == (finish == "length")
    assert b["truncated"].any() and not b["truncated"].all()
    for p in range(len(PROMPTS)):  # n distinct samples per prompt, not one sample repeated
        assert len({tuple(b["responses"][p * N + j]) for j in range(N)}) > 1

    # Rollout log-probs are the model's own: HF log-softmax of each sampled response token (temperature 1).
    model = _hf_model(hf_dir)
    with torch.no_grad():
        logp = torch.log_softmax(model(b["tokens"]).logits.float(), -1)
    ref = torch.zeros_like(b["rollout_logprobs"])
    ref[:, 1:] = logp[:, :-1].gather(-1, b["tokens"][:, 1:, None])[..., 0] * b["response_mask"][:, 1:]
    assert (ref - b["rollout_logprobs"]).abs().max() <= 1e-4

    # Greedy decoding in the two groups equals transformers' greedy generate (up to the first eos).
    g = results[0]["greedy"]
    for p, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY_NEW,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)
        expected = _cut_at_eos(out[0, len(prompt):].tolist(), eos)
        assert len(set(expected)) > 2  # a non-degenerate reference
        assert _cut_at_eos(g["responses"][p], eos) == expected, p
        assert bool(g["truncated"][p]) == (len(expected) == GREEDY_NEW and expected[-1] != eos)
        assert math.isclose(float(g["response_mask"][p].sum()), len(g["responses"][p]))


def test_duplicate_prompts_get_independent_samples(groups_run):
    """Each prompt has its own seed: the same prompt several times in one batch (two copies in each group's one
    vLLM call) is sampled independently."""
    _, results = groups_run
    responses = results[0]["duplicates"]
    assert responses == results[1]["duplicates"] and len(responses) == 8  # gathered: the whole batch everywhere
    per_prompt = [responses[2 * p: 2 * p + 2] for p in range(4)]
    assert per_prompt[0] != per_prompt[1] and per_prompt[2] != per_prompt[3]  # within one call
    assert per_prompt[0] != per_prompt[2]  # across the groups
    assert len({tuple(r) for r in responses}) >= 4
