"""`a3po eval` end to end on a tiny random model (vLLM CPU): one jsonl per task kind; the results JSON holds
every benchmark with the right counts. The same engine then serves `evaluate_items`, the trainer's call."""

import json
import subprocess
import sys

import pytest

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_a3po.models.tiny import write_tiny_hf_checkpoint

    d = tmp_path_factory.mktemp("eval")
    model = str(write_tiny_hf_checkpoint(d / "m", "qwen2", seed=0))
    files = {
        "math": _write(d / "math.jsonl", [{"problem": f"{i}+1?", "answer": str(i + 1)} for i in range(3)]),
        "mc": _write(d / "mc.jsonl", [{"question": "Q?", "options": ["a", "b", "c"], "answer": "B"}] * 2),
        "code": _write(d / "code.jsonl", [{"question": "echo", "tests": [{"input": "1\n", "output": "1\n"}]}]),
    }
    return d, model, files


def _eval(tiny, out, *extra):
    d, model, files = tiny
    cmd = \
        [sys.executable, "-c", "import sys; from megatron_a3po.cli import a3po; sys.exit(a3po(sys.argv[1:]))", "eval"]
    return subprocess.run(cmd + ["--model", model, "--benchmark", f"m={files['math']}",
                                 "--benchmark", f"g={files['mc']}:mc", "--benchmark", f"c={files['code']}",
                                 "--n", "4", "--max-new-tokens", "8", "--dtype", "float32", "--cpu-kv-cache-gb", "1",
                                 "--output", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **ENV})


@pytest.fixture(scope="module")
def tp1_run(tiny):
    out = tiny[0] / "results.json"
    return _eval(tiny, out), out


def test_cli_end_to_end(tiny, tp1_run):
    proc, out = tp1_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["benchmarks"]) == ["m", "g", "c"]
    for name, items, kind in [("m", 3, "math"), ("g", 2, "multiple_choice"), ("c", 1, "code")]:
        b = res["benchmarks"][name]
        s = b["summary"]
        assert s["kind"] == kind and s["items"] == items and s["n"] == 4
        assert set(s) >= {"avg@4", "pass@1", "pass@2", "pass@4", "length_mean", "truncated_fraction"}
        assert len(b["items"]) == items and all(len(it["correct"]) == 4 for it in b["items"])
        assert len(b["samples"]) == items and all(len(x) == 4 for x in b["samples"])
        assert 0 < s["length_mean"] <= 8
    assert set(res["average"]) >= {"avg@4", "pass@4"} and res["sandbox"]["namespaces"] in (True, False)
    assert "| m | math | 3 |" in proc.stdout and "**average**" in proc.stdout


def test_cli_tensor_parallel_2_reproduces_tp1(tiny, tp1_run):
    """--tensor-parallel-size 2 relaunches under torchrun (2 ranks, vLLM TP=2); per-prompt seeds and fp32 make
    the samples, hence every score, identical to TP=1."""
    out = tiny[0] / "results_tp2.json"
    proc = _eval(tiny, out, "--tensor-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp1, tp2 = json.loads(tp1_run[1].read_text()), json.loads(out.read_text())
    for name in ("m", "g", "c"):
        assert tp2["benchmarks"][name]["samples"] == tp1["benchmarks"][name]["samples"], name
        untimed = [{k: v for k, v in run["benchmarks"][name]["summary"].items() if k != "seconds"} for run in (tp1, tp2)]
        assert untimed[0] == untimed[1], name
    assert proc.stdout.count("| m | math | 3 |") == 1  # only rank 0 reports


def test_cli_refuses_bad_input(tiny, tmp_path):
    from megatron_a3po.cli import a3po

    d, model, files = tiny
    assert a3po(["eval", "--model", str(tmp_path), "--benchmark", f"m={files['math']}", "--output", "x.json"]) == 2
    bad = _write(tmp_path / "bad.jsonl", [{"problem": "x"}])
    assert a3po(["eval", "--model", model, "--benchmark", f"m={bad}:math", "--output", "x.json"]) == 2
