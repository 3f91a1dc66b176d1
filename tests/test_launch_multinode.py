"""The multi-node launch path on loopback: two torchrun agents as two "nodes" through launch/node.sh, the very
script launch/slurm/a3po.sbatch runs on every node (c10d rendezvous hosted by node 0, one rank per node, DP=2
across the nodes), train 2 RL steps of the tiny config to the end. Plus the shell launchers' syntax and the
pass-through of flags."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from megatron_a3po.parallel import free_port

NODE_SH = REPO / "launch/node.sh"
TINY_2_STEPS = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "--tiny-model", "qwen2",
                "--tensor-model-parallel-size", "1", "--train-steps", "2", "--rollout-batch-size", "8",
                "--ppo-mini-batch-size", "4", "--rollout-n", "4", "--micro-batch-size", "8",
                "--max-response-length", "6", "--eval-prompts", "8", "--eval-n", "2", "--eval-interval", "0"]
# The two-node run also trains with DAPO dynamic sampling (DP=2 across the nodes); the reward hook scores the
# first character's parity, so the random model's groups are a mix of informative and constant ones.
DYNAMIC = ["--reward", "layout_reward:first_char_parity", "--dynamic-sampling", "--max-num-gen-batches", "3"]
# ... with the user shaper of docs/algorithms.md registered from its YAML (examples/hooks), and vLLM sampling in
# bf16 while Megatron trains in fp32, corrected by IcePop with a band tight enough to reject some tokens.
ICEPOP_C = 1.002
HOOK_AND_MISMATCH = ["--config", str(REPO / "examples/hooks/entropy_boost.yaml"), "--rollout-dtype", "bfloat16",
                     "--rollout-correction", "icepop", "--rollout-correction-threshold", str(ICEPOP_C)]


def node_env(rank: int, port: int, **extra: str) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "NODE_RANK": str(rank), "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": f"loopback-{port}",
            "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "examples/hooks"),
                                           os.environ.get("PYTHONPATH", "")]), **extra}


def start_node(rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(NODE_SH), *args], cwd=REPO, env=node_env(rank, port),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_two_nodes_on_loopback_train_two_rl_steps_with_dynamic_sampling(tmp_path):
    out, port = tmp_path / "out", free_port()
    args = [*TINY_2_STEPS, *DYNAMIC, *HOOK_AND_MISMATCH, "--output-dir", str(out)]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [start_node(0, port, args, logs[0])]
    try:
        # Node 0 first: its pre-flight checks MASTER_PORT is free, then its agent hosts the rendezvous store.
        deadline = time.monotonic() + 120
        while "torchrun 1 ranks" not in logs[0].read_text():
            assert nodes[0].poll() is None, logs[0].read_text()[-4000:]
            assert time.monotonic() < deadline, "node 0 never got past pre-flight"
            time.sleep(0.2)
        nodes.append(start_node(1, port, args, logs[1]))
        codes = [node.wait(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            kill_tree(node)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in texts)
    for rank, text in enumerate(texts):
        assert f"preflight ok (node {rank}): world 2 = 2 node(s) x 1" in text
        assert f"node {rank}/2: torchrun 1 ranks, rendezvous 127.0.0.1:{port}" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "train/lr" in r]
    assert sorted(r["step"] for r in steps) == [1, 2]
    assert "validation accuracy: before" in texts[0] + texts[1]
    for r in steps:  # dynamic sampling: only groups whose rewards vary reach training
        assert 1 <= r["dynamic/rounds"] <= 3
        assert r["dynamic/kept"] == r["dynamic/trained_prompts"] == 8  # a full batch of informative groups
        assert r["buckets/0_of_4"] == 0 and r["buckets/4_of_4"] == 0  # no constant group reached training
        assert r["dynamic/dropped_all_correct"] + r["dynamic/dropped_all_wrong"] + r["dynamic/kept"] + \
            r["dynamic/surplus"] == 8 * r["dynamic/rounds"]
        assert r["train/grad_norm"] > 0
        # The user hook ran as the shaper with its YAML settings and the input it declared (old_entropy: it
        # raises without it): it boosted some tokens of positive responses (ratio 0.25 of each), logged its metric.
        assert r["entropy_boost/boost"] == 1.5 and 0 < r["entropy_boost/shaped_token_fraction"] <= 0.25
        assert "a3po/weight_pos" not in r
        # bf16 sampling vs fp32 training: a measurable mismatch, and IcePop rejects the tokens outside its band
        # [1/C, C] (some, not all) and weights the kept ones by r inside it.
        assert 0 < r["mismatch/logp_abs_mean"] < r["mismatch/logp_abs_max"] < 0.1 and r["mismatch/kl_k3"] > 0
        assert r["mismatch/logp_abs_max"] > math.log(ICEPOP_C)  # so some token had to be rejected
        assert 0 < r["correction/masked_fraction"] < 1 and r["correction/truncated_fraction"] == 0
        assert 1 / ICEPOP_C <= r["correction/weight_mean"] <= ICEPOP_C
        for side in ("pos", "neg"):
            assert 0 <= r[f"{side}/correction_masked_fraction"] <= 1 and r[f"{side}/mismatch_kl_k3"] > 0


def test_launch_scripts_parse_and_pass_flags_through(tmp_path):
    scripts = [NODE_SH, REPO / "launch/torchrun.sh", REPO / "launch/slurm/a3po.sbatch",
               REPO / "launch/docker/run_node.sh"]
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"
    # A flag the trainer does not know reaches it unchanged and is refused there (pre-flight parses the same way).
    proc = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), "--config", str(REPO / "configs/tiny_cpu.yaml"),
                           "--tiny-model", "qwen2", "--no-such-megatron-flag", "7"], cwd=REPO, capture_output=True,
                          text=True, env={**node_env(0, free_port()), "NNODES": "1"}, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-megatron-flag 7" in proc.stderr, proc.stderr


def test_sbatch_sets_up_the_rendezvous_and_resumes_from_save_dir(tmp_path):
    """The sbatch script's own logic with SLURM's two commands replaced (no SLURM here): `scontrol` lists the
    allocation, `srun` prints what each node would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/bash\necho "NNODES=$NNODES MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT '
                                  'NPROC_PER_NODE=$NPROC_PER_NODE RDZV_ID=$RDZV_ID NCCL_IB_TIMEOUT=$NCCL_IB_TIMEOUT"\n'
                                  'echo "srun $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NAME": "a3po",
           "SLURM_GPUS_ON_NODE": "8", "LOG_DIR": str(tmp_path / "logs")}
    sbatch = ["bash", str(REPO / "launch/slurm/a3po.sbatch"), "--config", "configs/qwen3-8b-base_a3po.yaml",
              "--load", "/ckpt/qwen3-8b-base"]

    out = subprocess.run(sbatch, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert ("NNODES=2 MASTER_ADDR=gpu-node-07 MASTER_PORT=24242 NPROC_PER_NODE=8 RDZV_ID=4242 NCCL_IB_TIMEOUT=22"
            in out.stdout)
    assert (f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output {tmp_path}/logs/node%n.log bash launch/node.sh "
            "--config configs/qwen3-8b-base_a3po.yaml --load /ckpt/qwen3-8b-base") in out.stdout
    # A requeued job (preemption): SAVE_DIR holds a checkpoint, so --load SAVE_DIR is added after the user's flags
    save = tmp_path / "save"
    save.mkdir()
    out = subprocess.run(sbatch, env={**env, "SAVE_DIR": str(save), "NCCL_IB_TIMEOUT": "20"}, capture_output=True,
                         text=True, timeout=30)
    assert f"--load /ckpt/qwen3-8b-base --save {save}\n" in out.stdout and "NCCL_IB_TIMEOUT=20" in out.stdout
    (save / "latest").write_text("step_000040\n")
    out = subprocess.run(sbatch, env={**env, "SAVE_DIR": str(save)}, capture_output=True, text=True, timeout=30)
    assert f"resuming from {save} (step_000040)" in out.stdout
    assert f"--load /ckpt/qwen3-8b-base --save {save} --load {save}\n" in out.stdout


def test_docker_run_node_passes_secrets_by_name_only(tmp_path):
    """run_node.sh with DOCKER=echo prints the docker command it would run: WANDB_API_KEY goes in by name
    (-e WANDB_API_KEY), never its value, and the training flags are passed unchanged."""
    secret = "wandb-secret-value-123"
    proc = subprocess.run(["bash", str(REPO / "launch/docker/run_node.sh"), "--config", "configs/x.yaml",
                           "--lr", "2e-6"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "DOCKER": "echo", "WANDB_API_KEY": secret, "NNODES": "2",
                               "NODE_RANK": "1", "MASTER_ADDR": "head0", "DATA_DIR": str(tmp_path),
                               "CKPT_DIR": str(tmp_path), "HF_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout
    assert secret not in cmd and secret not in proc.stderr
    for part in ("--gpus all", "--network host", "--ipc host", "-e WANDB_API_KEY ", "-e NODE_RANK=1",
                 "-e MASTER_ADDR=head0", f"-v {tmp_path}:/data", "launch/node.sh --config configs/x.yaml --lr 2e-6"):
        assert part in cmd, cmd


if __name__ == "__main__":
    pytest.main([__file__])
