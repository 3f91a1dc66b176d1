"""Issue 24, item 10: `--dry-run` (and pre-flight) catch what the job will read, before any node builds a model.

Every row of --dataset / --eval-dataset goes through the job's own loader (rl_job.build_data): a bad row or an
unreadable file is a one-line error (exit 2), prompts longer than --max-prompt-length are counted and left out as
the loader does at run time; the --reward function is imported; a malformed YAML file is one line naming the
place; abbreviated flags are refused by every command line (Megatron-LM's allow_abbrev=False). Before the fix the
dry-run read none of these (exit 0), a YAML error was a traceback and `--max-prompt-len 5` meant
--max-prompt-length 5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_a3po import plan_cli, sft, train
from megatron_a3po.models import tiny
from megatron_a3po.parallel import free_port
from megatron_a3po.preflight import check
from helpers import REPO

TINY = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2"]  # raw prompts, <= 16 tokens


@pytest.fixture(autouse=True)
def world_of_two(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # tiny_cpu's TP 2


def rows_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "ground_truth": "1"}) + "\n" for p in prompts))
    return path


def dry_run(capsys, *flags: str) -> tuple[int, str, str]:
    code = train.main([*TINY, *flags, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_row_is_read_and_too_long_prompts_counted(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # the tiny tokenizer is character-level: a raw prompt of n characters is n tokens
    assert len(tiny.build_tokenizer()("1234567", add_special_tokens=False)["input_ids"]) == 7
    train_file = rows_file(tmp_path / "train.jsonl", ["1+1=", "2" * 16, "3" * 20, "4+4=", "5" * 31])
    eval_file = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "reward_model": {"ground_truth": "3", "style": "rule"}}
                                         for p in ("1+2=", "12+2=")]), eval_file)  # DAPO-Math-17k's columns
    code, out, err = dry_run(capsys, "--dataset", str(train_file), "--eval-dataset", str(eval_file))
    assert code == 0, err
    lines = out.splitlines()
    assert f"--dataset {train_file}: 5 rows, 2 prompts longer than --max-prompt-length 16 (longest 31 tokens) left " \
           "out as the job's loader does, 3 used" in lines
    assert f"--eval-dataset {eval_file}: 2 rows, all used (longest prompt 5 tokens, --max-prompt-length 16)" in lines
    code, out, err = dry_run(capsys)  # tiny_cpu's synthetic data: no file
    assert code == 0 and "--dataset synthetic:arithmetic:1: 5000 rows, all used" in out


def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "ground_truth": "2"}\n{"prompt": "2+2=", "ground_truth": "4"}\n'
                    '{"prompt": "3+3="}\n')
    code, _, err = dry_run(capsys, "--dataset", str(data), "--eval-dataset", str(data))
    assert code == 2
    assert err == (f"input error: {data} line 3: missing ground truth (neither 'reward_model.ground_truth' nor "
                   "'ground_truth'); fix or remove that row (in Python, PromptDataset's skip_bad_rows=True skips "
                   "and counts bad rows)\n")


def test_an_unreadable_file_is_one_line(tmp_path, capsys):
    not_parquet = tmp_path / "data.parquet"
    not_parquet.write_bytes(b"this is not parquet\n")
    not_utf8 = tmp_path / "data.jsonl"
    not_utf8.write_bytes(b'{"prompt": "1+1=", "ground_truth": "2"}\n\xff\xfe\n')
    a_dir = tmp_path / "dir.jsonl"
    a_dir.mkdir()
    for path, problem in ((not_parquet, "cannot read dataset file"), (not_utf8, "cannot read dataset file"),
                          (a_dir, "is not a file")):
        code, _, err = dry_run(capsys, "--dataset", str(path), "--eval-dataset", str(path))
        assert code == 2 and err.startswith("input error: ") and problem in err and err.count("\n") == 1, err
        assert str(path) in err and "Traceback" not in err


def test_no_prompt_short_enough_and_a_bad_synthetic_level(tmp_path, capsys):
    data = rows_file(tmp_path / "long.jsonl", ["9" * 17, "8" * 40])
    code, _, err = dry_run(capsys, "--dataset", str(data), "--eval-dataset", str(data))
    assert code == 2 and "no usable prompts (2 rows, 0 bad, 2 longer than --max-prompt-length 16, the longest 40 " \
                         "tokens)" in err and err.count("\n") == 1
    code, _, err = dry_run(capsys, "--dataset", "synthetic:arithmetic:9")
    assert code == 2 and err.startswith("input error: --dataset synthetic:arithmetic:9: unknown arithmetic level 9")
    assert "use synthetic:arithmetic:LEVEL with LEVEL one of 1, 2, 3, 4, 5, 6" in err and err.count("\n") == 1


def test_the_reward_function_is_imported(capsys):
    code, _, err = dry_run(capsys, "--reward", "no_such_reward_module:score")
    assert code == 2 and err == ("input error: --reward no_such_reward_module:score: custom reward "
                                 "'no_such_reward_module:score': cannot import module 'no_such_reward_module' (No "
                                 "module named 'no_such_reward_module'); make sure it is on PYTHONPATH\n")
    code, _, err = dry_run(capsys, "--reward", "megatron_a3po.rewards.synthetic:no_such_function")
    assert code == 2 and "has no attribute 'no_such_function'" in err and "importable package.module:function" in err
    code, _, err = dry_run(capsys, "--reward", "megatron_a3po.rewards.synthetic:arithmetic_reward")
    assert code == 0, err


def test_a_model_dir_without_a_tokenizer(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(tiny.hf_config("qwen2").to_json_string())
    code, _, err = train.main(["--config", str(REPO / "configs/tiny_cpu.yaml"), "--hf-path", str(model),
                               "--dry-run"]), *capsys.readouterr()
    assert code == 2 and err == (f"input error: {model} has no tokenizer (tokenizer.json or tokenizer_config.json), "
                                 "and the job tokenizes its prompts with the model's own; copy the model's tokenizer "
                                 "files there\n")


def test_preflight_reads_the_same_inputs(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "ground_truth": "2"}\n{"question": "2+2="}\n')
    env = {"NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    problems, _ = check([*TINY, "--dataset", str(data), "--eval-dataset", str(data), "--reward", "no_such_mod:f",
                         "--output-dir", str(tmp_path / "out")], env)
    assert problems == [
        "--reward no_such_mod:f: custom reward 'no_such_mod:f': cannot import module 'no_such_mod' (No module named "
        "'no_such_mod'); make sure it is on PYTHONPATH",
        f"{data} line 2: missing 'prompt'; fix or remove that row (in Python, PromptDataset's skip_bad_rows=True "
        "skips and counts bad rows)"]


YAML_ERRORS = [
    ("rl:\n  max_prompt_length: 16\n   max_response_length: 8\n", "line 3, column 23: mapping values are not allowed "
                                                                  "here"),
    ("rl: [a, b\n", "line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"),
    ("rl:\n\tmax_prompt_length: 16\n", "line 2, column 1: found character '\\t' that cannot start any token"),
]


@pytest.mark.parametrize("text,where", YAML_ERRORS, ids=["indent", "unclosed", "tab"])
def test_a_yaml_error_is_one_line_with_its_place(text, where, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert train.main(["--config", str(path), "--tiny-model", "qwen2", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"config error: --config {path}: invalid YAML at {where}")
    assert err.endswith("; fix the file's syntax there\n") and err.count("\n") == 1
    (tmp_path / "list.yaml").write_text("rl: [a, b]\n")
    assert train.main(["--config", str(tmp_path / "list.yaml"), "--dry-run"]) == 2
    assert "section rl: must be a mapping" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-prompt-len", "--max-prompt-len=5"])
def test_the_trainer_refuses_an_abbreviated_flag(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, *([flag] if "=" in flag else [flag, "5"]), "--dry-run"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert f"error: unrecognized arguments: {flag}" in last
    assert last.endswith("(--max-prompt-len abbreviates --max-prompt-length: flags are not abbreviated, spell them "
                         "in full)")


def _convert(argv):
    from checkpoints_tools.convert import build_parser

    return build_parser().parse_args(argv)


def _eval(argv):
    from megatron_a3po.evaluation.cli import run

    return run(argv)


CLIS = {  # each with an abbreviation of one of its own optional flags, everything it requires given
    "sft": (sft.main, ["--sft-output", "out", "--hf-path", "x", "--sft-st", "3"], "--sft-st"),
    "a3po plan": (plan_cli.main, ["--config", str(REPO / "configs/qwen3-8b-base_a3po.yaml"), "--mark"], "--mark"),
    "a3po eval": (_eval, ["--model", "m", "--benchmark", "b=f.jsonl:math", "--output", "o", "--temp", "0.6"],
                  "--temp"),
    "a3po-convert": (_convert, ["verify", "--hf-path", "h", "--megatron-path", "m", "--tol", "1e-3"], "--tol"),
    "tiny": (tiny.main, ["--out", "o", "--fam", "qwen3"], "--fam"),
}


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_command_line_refuses_abbreviations(cli, capsys):
    main, argv, abbreviation = CLIS[cli]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err
