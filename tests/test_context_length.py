"""Issue 24, item 1: the rollout context length. The job asks vLLM for max_model_len = --max-prompt-length +
--max-response-length (job.rollout_max_model_len), and refuses at resolve time (--dry-run, pre-flight, a3po plan)
a config whose sum exceeds the model's context, which vLLM would refuse in every rank's engine start.

vLLM's own check runs here on CPU: `vllm.config.ModelConfig` (no weights, no device) built from the very directory
the job hands vLLM (rl_job.vllm_model_dir) raises in `_get_and_verify_max_len` (vllm/config/model.py) when
max_model_len exceeds the length it derives from config.json. Before the fix the job asked for prompt + response
+ 8: 4104 for Qwen2.5-Math-7B, whose max_position_embeddings is 4096.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_a3po import config as C
from megatron_a3po import plan_cli, train
from megatron_a3po.job import model_context_length, resolve_job
from megatron_a3po.models.known_archs import PAPER_MODELS
from megatron_a3po.models.tiny import build_tokenizer
from megatron_a3po.rl_job import vllm_model_dir
from helpers import PAPER_FAMILIES, REPO

# config.json's model_type, which transformers' AutoConfig (and so vLLM) needs; the table keeps architectures only
MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
TOO_LONG = "greater than the derived max_model_len"  # _get_and_verify_max_len's ValueError


@pytest.fixture(scope="module")
def model_config():
    from vllm.config import ModelConfig  # the CPU build: constructing it needs no device

    return ModelConfig


def hf_dir(root: Path, hf_config: dict, name: str = "model") -> Path:
    """A model directory without weights: config.json and a tokenizer (the tiny one: vLLM only loads it)."""
    out = root / name
    out.mkdir(parents=True)
    cfg = {**hf_config, "model_type": MODEL_TYPES[hf_config["architectures"][0]]}
    (out / "config.json").write_text(json.dumps(cfg))
    build_tokenizer().save_pretrained(out)
    return out


def paper_job(config: str, tmp_path: Path, *flags: str):
    """The paper config resolved for 2 x 8 GPUs, its model the real architecture (config.json from known_archs)."""
    cfg, _ = C.parse_args(["--config", str(REPO / "configs" / config)])
    model = Path(cfg.model.hf_path).name
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "ground_truth": "2"}) + "\n")
    cfg, _ = C.parse_args(["--config", str(REPO / "configs" / config), "--hf-path",
                           str(hf_dir(tmp_path, PAPER_MODELS[model], model)), "--dataset", str(data),
                           "--eval-dataset", str(data), *flags])
    return resolve_job(cfg, 16)


@pytest.mark.parametrize("config", sorted(PAPER_FAMILIES))
def test_vllm_accepts_the_length_each_paper_job_requests(config, tmp_path, model_config):
    job = paper_job(config, tmp_path)
    rl, limit = job.cfg.rl, job.model.hf_config["max_position_embeddings"]
    assert job.rollout_max_model_len == rl.max_prompt_length + rl.max_response_length <= limit
    engine_dir = vllm_model_dir(tmp_path / "out", job.model)  # what rl_job.run hands RolloutEngine
    accepted = model_config(model=str(engine_dir), max_model_len=job.rollout_max_model_len, dtype="bfloat16")
    assert accepted.max_model_len == job.rollout_max_model_len
    with pytest.raises(ValueError, match=TOO_LONG):  # one token more and vLLM's own check refuses
        model_config(model=str(engine_dir), max_model_len=limit + 1, dtype="bfloat16")
    if config == "qwen2.5-math-7b_a3po.yaml":  # the pre-fix request, prompt + response + 8 = 4104 > 4096
        assert rl.max_prompt_length + rl.max_response_length == limit == 4096
        with pytest.raises(ValueError, match=r"max_model_len \(4104\) is greater than the derived max_model_len"):
            model_config(model=str(engine_dir), max_model_len=limit + 8, dtype="bfloat16")


ROPE_VARIANTS = {
    "plain": {},
    "linear x2": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},  # vLLM multiplies the length
    "dynamic x4": {"rope_scaling": {"type": "dynamic", "factor": 4.0}},  # the older spelling of the type
    "yarn x4": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_the_jobs_context_rule_is_vllms(model, variant, tmp_path, model_config):
    """model_context_length (what resolve_job refuses beyond) is the length vLLM derives for the same config.json:
    asked for no length, vLLM takes exactly its limit."""
    engine_dir = hf_dir(tmp_path, {**PAPER_MODELS[model], **ROPE_VARIANTS[variant]})
    derived = model_config(model=str(engine_dir), dtype="bfloat16").max_model_len
    ours, _ = model_context_length(json.loads((engine_dir / "config.json").read_text()))
    assert ours == derived
    with pytest.raises(ValueError, match=TOO_LONG):
        model_config(model=str(engine_dir), max_model_len=ours + 1, dtype="bfloat16")


REFUSAL = ("--max-prompt-length 1024 + --max-response-length 3080 = 4104 tokens exceeds the model's context of 4096 "
           "tokens (max_position_embeddings, ")


def test_resolve_refuses_a_rollout_beyond_the_models_context(tmp_path):
    with pytest.raises(C.ConfigError) as err:
        paper_job("qwen2.5-math-7b_a3po.yaml", tmp_path, "--max-response-length", "3080")
    message = str(err.value)
    assert message.startswith(REFUSAL) and "\n" not in message
    assert message.endswith("lower --max-prompt-length or --max-response-length so that they sum to at most 4096")


def test_dry_run_refuses_it_in_one_line(tmp_path, monkeypatch, capsys):
    job_flags = ["--config", str(REPO / "configs/qwen2.5-math-7b_a3po.yaml"), "--hf-path",
                 str(hf_dir(tmp_path, PAPER_MODELS["Qwen2.5-Math-7B"])), "--dataset", "synthetic:arithmetic:1",
                 "--eval-dataset", "synthetic:arithmetic:1", "--max-response-length", "3080", "--dry-run"]
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert train.main(job_flags) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("config error: " + REFUSAL) and err.count("\n") == 1


def test_a3po_plan_refuses_it_in_one_line(capsys):
    """a3po plan resolves the model from known_archs (no files), and refuses the same config the same way."""
    assert plan_cli.main(["--config", str(REPO / "configs/qwen2.5-math-7b_a3po.yaml"), "--nodes", "2",
                          "--max-response-length", "3080"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: " + REFUSAL + "known architecture of Qwen2.5-Math-7B), which vLLM refuses; "
                                 "lower --max-prompt-length or --max-response-length so that they sum to at most "
                                 "4096\n")
    assert plan_cli.main(["--config", str(REPO / "configs/qwen2.5-math-7b_a3po.yaml"), "--nodes", "2"]) == 0
