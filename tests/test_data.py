"""Prompt datasets: DAPO-Math-17k parquet, jsonl, chat templates, bad rows, resumable sampling, dynamic sampling."""

import json

import pytest

from megatron_a3po.data import (DatasetError, DynamicSampler, PromptDataset, PromptSampler, check_tokenizer_fits,
                                tokenize_prompt)
from megatron_a3po.models.tiny import build_tokenizer
from megatron_a3po.rewards import make_arithmetic_dataset


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def dapo_row(i, question=None, answer=None):
    """One row shaped exactly like BytedTsinghua-SIA/DAPO-Math-17k."""
    question = question if question is not None else f"What is {i}+{i}?"
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"Solve: {question}\nAnswer: $Answer"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer if answer is not None else str(2 * i), "style": "rule"},
        "extra_info": {"index": f"id-{i}"},
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dapo_math_parquet_schema(tmp_path, tok):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write/read parquet")
    import pyarrow.parquet as pq

    rows = [dapo_row(i) for i in range(6)]
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = PromptDataset.from_files(path, tok, max_prompt_length=256)
    assert len(ds) == 6 and ds.stats == {"rows": 6, "bad_rows": 0, "too_long": 0, "kept": 6}
    item = ds[3]
    assert item.ground_truth == "6" and item.data_source == "math_dapo" and item.extra_info == {"index": "id-3"}
    assert item.prompt == rows[3]["prompt"]
    text = tok.decode(item.prompt_ids)
    assert text == "<|im_start|>user\n" + rows[3]["prompt"][0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
    assert item.source.endswith("dapo-math-17k.parquet row 3")


def test_parquet_bad_row_names_file_and_row(tmp_path, tok):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write/read parquet")
    import pyarrow.parquet as pq

    rows = [dapo_row(i) for i in range(4)]
    rows[2]["reward_model"] = {"ground_truth": None, "style": "rule"}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=r"bad\.parquet row 2: missing ground truth.*skip_bad_rows=True"):
        PromptDataset.from_files(path, tok, max_prompt_length=256)
    assert len(PromptDataset.from_files(path, tok, max_prompt_length=256, skip_bad_rows=True)) == 3


def test_dapo_math_jsonl_and_plain_rows(tmp_path, tok):
    rows = [dapo_row(i) for i in range(3)] + [{"prompt": "2+2=", "ground_truth": 4}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = PromptDataset.from_files(path, tok, max_prompt_length=256)
    assert [it.ground_truth for it in ds.items] == ["0", "2", "4", "4"]
    # a string prompt is wrapped as a user message when the tokenizer has a chat template
    assert tok.decode(ds[3].prompt_ids) == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"


BAD_ROWS = {
    "missing prompt": ({"reward_model": {"ground_truth": "1"}}, "missing 'prompt'"),
    "empty prompt": ({"prompt": "  ", "ground_truth": "1"}, "'prompt' is an empty string"),
    "prompt wrong type": ({"prompt": 5, "ground_truth": "1"}, "'prompt' must be a string or a list"),
    "bad message": ({"prompt": [{"role": "user"}], "ground_truth": "1"}, "'prompt' message 0 must be"),
    "empty messages": ({"prompt": [], "ground_truth": "1"}, "'prompt' is an empty message list"),
    "missing ground truth": ({"prompt": "1+1="}, "missing ground truth"),
    "ground truth wrong type": ({"prompt": "1+1=", "ground_truth": ["2"]}, "ground truth must be a string"),
    "ground truth bool": ({"prompt": "1+1=", "ground_truth": True}, "ground truth must be a string"),
    "reward_model wrong type": ({"prompt": "1+1=", "reward_model": "2"}, "'reward_model' must be an object"),
    "row not an object": ([1, 2], "row is a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_each_bad_row_case(tmp_path, tok, case):
    bad, message = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "data.jsonl", [dapo_row(0), dapo_row(1), bad, dapo_row(3)])
    with pytest.raises(DatasetError) as info:
        PromptDataset.from_files(path, tok, max_prompt_length=256)
    assert f"data.jsonl line 3: {message}" in str(info.value)
    ds = PromptDataset.from_files(path, tok, max_prompt_length=256, skip_bad_rows=True)
    assert len(ds) == 3 and ds.stats["bad_rows"] == 1


def test_invalid_json_line_is_a_bad_row(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(dapo_row(0)) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"broken\.jsonl line 2: invalid JSON"):
        PromptDataset.from_files(path, tok, max_prompt_length=256)


def test_empty_and_missing_datasets(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"no usable prompts \(0 rows"):
        PromptDataset.from_files(empty, tok, max_prompt_length=256)
    allbad = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "x"}])
    with pytest.raises(DatasetError, match="1 bad"):
        PromptDataset.from_files(allbad, tok, max_prompt_length=256, skip_bad_rows=True)
    with pytest.raises(DatasetError, match="does not exist"):
        PromptDataset.from_files(tmp_path / "nope.jsonl", tok, max_prompt_length=256)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DatasetError, match="unsupported dataset file"):
        PromptDataset.from_files(csv, tok, max_prompt_length=256)


def test_long_prompts_filtered_and_counted(tmp_path, tok, caplog):
    rows = [dapo_row(0, question="short"), dapo_row(1, question="x" * 300), dapo_row(2, question="y" * 10)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    ds = PromptDataset.from_files(path, tok, max_prompt_length=100)
    assert len(ds) == 2 and ds.stats["too_long"] == 1
    assert "filtered 1 prompts longer than max_prompt_length=100" in caplog.text
    with pytest.raises(DatasetError, match="raise max_prompt_length"):
        PromptDataset.from_files(path, tok, max_prompt_length=5)


def test_raw_prompts_and_missing_chat_template(tok):
    rows = make_arithmetic_dataset(20, 1, seed=0)
    ds = PromptDataset.from_dicts(rows, tok, max_prompt_length=16, raw_prompt=True)
    assert [tok.decode(it.prompt_ids) for it in ds.items] == [r["prompt"] for r in rows]
    assert all(len(it.prompt_ids) == 4 for it in ds.items)
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(DatasetError, match="no chat template.*raw_prompt=True"):
        tokenize_prompt(plain, "3+4=")
    with pytest.raises(DatasetError, match="no chat template"):
        tokenize_prompt(plain, [{"role": "user", "content": "hi"}])


def test_sampler_resume_yields_the_same_batches():
    ref = PromptSampler(10, seed=7)
    batches = [ref.next_indices(4) for _ in range(8)]  # crosses several epochs (10 is not a multiple of 4)
    for epoch_start in range(0, 30, 10):
        assert sorted(sum(batches, [])[epoch_start:epoch_start + 10]) == list(range(10))  # each epoch: all once
    assert sum(batches, [])[:10] != sum(batches, [])[10:20]  # reshuffled per epoch
    for stop in range(1, 8):
        first = PromptSampler(10, seed=7)
        for _ in range(stop):
            first.next_indices(4)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = PromptSampler(10, seed=7)
        resumed.load_state_dict(state)
        assert [resumed.next_indices(4) for _ in range(8 - stop)] == batches[stop:]
    assert PromptSampler(10, seed=8).next_indices(10) != batches[0] + batches[1][:6]
    assert PromptSampler(10, seed=7, shuffle=False).next_indices(3) == [0, 1, 2]


def test_sampler_refuses_a_changed_dataset():
    state = PromptSampler(10, seed=1).state_dict()
    with pytest.raises(DatasetError, match="made with 10 prompts and seed 1, but this run has 11 prompts"):
        PromptSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(DatasetError, match="empty dataset"):
        PromptSampler(0)


def test_dynamic_sampler_counts_and_trim():
    ds = DynamicSampler(target_prompts=3, max_num_gen_batches=5)
    kept = ds.add([[1, 1, 1], [0, 0, 0], [1, 0, 1], [-1, -1, -1], [0.5, 0.5, 0.5]], groups=list("abcde"))
    assert kept == 1 and not ds.full and not ds.done
    assert ds.stats == {"kept": 1, "dropped_all_correct": 2, "dropped_all_wrong": 2, "rounds": 1, "surplus": 0}
    ds.add([[0, 1], [1, 0], [1, 1], [0, 1]], groups=list("fghi"))
    assert ds.full and ds.done
    batch, stats = ds.take()
    assert batch == ["c", "f", "g"]
    assert stats == {"kept": 3, "dropped_all_correct": 3, "dropped_all_wrong": 2, "rounds": 2, "surplus": 1}
    assert ds.stats["rounds"] == 0 and not ds.full  # reset for the next step


def test_dynamic_sampler_round_cap():
    ds = DynamicSampler(target_prompts=4, max_num_gen_batches=2)
    ds.add([[1, 1], [0, 1]])
    assert not ds.done
    ds.add([[0, 0], [0, 0]])
    assert ds.exhausted and ds.done and not ds.full
    batch, stats = ds.take()
    assert batch == [1] and stats["rounds"] == 2 and stats["dropped_all_wrong"] == 2
    unlimited = DynamicSampler(target_prompts=1, max_num_gen_batches=0)
    for _ in range(50):
        unlimited.add([[0, 0]])
    assert not unlimited.done
    with pytest.raises(ValueError, match="2 reward groups but 1 payloads"):
        unlimited.add([[0, 1], [1, 0]], groups=["x"])


def test_check_tokenizer_fits(tok):
    check_tokenizer_fits(tok, 128)
    check_tokenizer_fits(tok, len(tok))
    with pytest.raises(ValueError, match=f"tokenizer has {len(tok)} tokens .* vocab_size is 64"):
        check_tokenizer_fits(tok, 64)
