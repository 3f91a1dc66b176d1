"""Pre-flight checks (megatron_a3po.preflight, run by launch/node.sh before torchrun): each refusal names the
problem and the fix, and a refused launch never reaches torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO
from megatron_a3po.parallel import free_port
from megatron_a3po.preflight import check

TINY = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2"]


def env(**values: str) -> dict:
    base = {"NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}
    return {**base, **values}


def test_a_good_launch_passes(tmp_path):
    problems, summary = check([*TINY, "--output-dir", str(tmp_path / "out"), "--save", str(tmp_path / "ckpt")], env())
    assert problems == [] and summary.splitlines() == [
        "world 2 = 1 node(s) x 2",
        "--dataset synthetic:arithmetic:1: 5000 rows, all used (longest prompt 4 tokens, --max-prompt-length 16)",
        "validation (128 held-out prompts of synthetic:arithmetic:1): 128 rows, all used (longest prompt 4 tokens, "
        "--max-prompt-length 16)"]
    assert (tmp_path / "ckpt").is_dir() and not list((tmp_path / "ckpt").iterdir())  # the probe is gone


def test_config_is_validated_for_the_whole_jobs_world_size(tmp_path):
    # tiny_cpu has TP 2: 3 nodes x 1 rank cannot host it; found here, not after the rendezvous
    problems, _ = check([*TINY, "--output-dir", str(tmp_path)], env(NNODES="3", NPROC_PER_NODE="1"))
    assert any("world size 3 is not divisible" in p and "world size 3)" in p for p in problems), problems
    problems, _ = check(["--config", str(tmp_path / "missing.yaml")], env())
    assert problems == [f"--config {tmp_path / 'missing.yaml'}: file not found"]
    problems, _ = check([*TINY, "--load", str(tmp_path / "no-ckpt"), "--output-dir", str(tmp_path)], env())
    assert any(f"--load {tmp_path / 'no-ckpt'}: path does not exist" in p for p in problems), problems


def test_unwritable_save_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where a directory should be: not creatable by anyone, root included
    problems, _ = check([*TINY, "--output-dir", str(tmp_path / "out"), "--save", str(blocker / "ckpt")], env())
    assert len(problems) == 1 and problems[0].startswith(f"--save {blocker / 'ckpt'}: not writable"), problems
    assert "shared filesystem" in problems[0]


def test_small_dev_shm_is_refused(tmp_path):
    problems, _ = check([*TINY, "--output-dir", str(tmp_path)], env(A3PO_MIN_SHM_GIB="1000000"))
    assert len(problems) == 1 and problems[0].startswith("/dev/shm is ") and "--shm-size" in problems[0]


def test_rendezvous_host_must_resolve_and_port_be_free(tmp_path):
    problems, _ = check([*TINY, "--output-dir", str(tmp_path)], env(MASTER_ADDR="no-such-head-node.invalid"))
    assert len(problems) == 1 and "MASTER_ADDR 'no-such-head-node.invalid' does not resolve" in problems[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        problems, _ = check([*TINY, "--output-dir", str(tmp_path)], env(MASTER_PORT=port))
        assert len(problems) == 1 and f"MASTER_PORT {port} is already in use" in problems[0]
        # only node 0 hosts the store: other nodes do not care that the port is busy on their machine
        assert check([*TINY, "--output-dir", str(tmp_path)], env(MASTER_PORT=port, NNODES="2", NODE_RANK="1",
                                                                 NPROC_PER_NODE="1"))[0] == []


def test_node_sh_stops_before_torchrun_and_lists_every_problem(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/node.sh"), *TINY, "--output-dir", str(tmp_path),
                           "--load", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env(MASTER_ADDR="no-such-head-node.invalid", A3PO_MIN_SHM_GIB="1e6"),
                               "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("preflight error (node 0): ")]
    assert len(errors) == 3, proc.stderr
    assert "torchrun" not in proc.stdout  # never launched


if __name__ == "__main__":
    pytest.main([__file__])
