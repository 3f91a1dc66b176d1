# megatron-a3po for GPU clusters:  docker build -t megatron-a3po .   (then launch/docker/run_node.sh on every node)
# One Python stack, ABI-consistent by construction. The base is plain CUDA 13.0 (devel: nvcc and headers for the two
# builds below, and for FlashInfer's and Triton's JIT at run time); it has no Python packages and no pip pins, so
# nothing meets ours. Into a fresh venv goes uv.lock's gpu set by hash (launch/docker/requirements-gpu.txt): torch
# 2.13.0, the version vLLM 0.32.0's wheel declares, vLLM, megatron-core, Transformer Engine's core library. Then the two
# parts compiled here against that torch: Transformer Engine's torch extension (PyPI ships it as source only) and
# apex's CUDA extensions (not on PyPI: a pinned commit). A build step LOADS every compiled extension with the CUDA
# driver stubbed (launch/docker/check_image.py), so a mismatch fails the build, not the first job. `make docker-check`
# resolves the set on CPU; tests/test_dockerfile.py holds the rules (CUDA_TAG's major.minor == torch.version.cuda...).
ARG CUDA_TAG=13.0.2-cudnn-devel-ubuntu24.04
FROM nvidia/cuda:${CUDA_TAG}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PIP_CONSTRAINT is emptied on purpose: the image's pins are the lock's alone (a base that sets one, like NGC's
# /etc/pip/constraint.txt, would silently hold packages at its own versions).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda \
    PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHON=python \
    HF_HOME=/home/a3po/.cache/huggingface

# Ubuntu 24.04's CPython 3.12 (the lock is for 3.12); the distro snapshot is the base tag's, so no apt version pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.12 python3.12-dev \
        python3.12-venv g++ ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# Non-root user; build with --build-arg UID=$(id -u) so checkpoints on shared mounts belong to you. Ubuntu 24.04
# images ship a user 'ubuntu' with uid 1000: removed so that uid is free. USER is numeric so hosts resolve it.
ARG UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid "${UID}" a3po \
    && useradd --create-home --uid "${UID}" --gid "${UID}" --shell /bin/bash a3po \
    && mkdir -p /home/a3po/.cache/huggingface /opt/megatron-a3po/runs \
    && chown -R a3po:a3po /home/a3po /opt/megatron-a3po

# Third-party packages first: these layers are reused while only the project's code changes. Wheels only, each
# checked against uv.lock's hash; --no-deps: the file is the complete resolved set.
COPY launch/docker/requirements-gpu.txt launch/docker/requirements-gpu-source.txt /tmp/requirements/
RUN pip install --no-cache-dir --no-deps --require-hashes --only-binary :all: \
        --requirement /tmp/requirements/requirements-gpu.txt

# Transformer Engine's torch extension, compiled against the torch above (FORCE_BUILD: never a prebuilt wheel made for
# another torch). Build args reach RUN as environment: TORCH_CUDA_ARCH_LIST (A100, H100/H200, B200), MAX_JOBS (bounds
# the compile's memory).
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0"
ARG MAX_JOBS=8
# hadolint ignore=DL3059
RUN NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE \
        pip install --no-cache-dir --no-deps --no-build-isolation --require-hashes \
        --requirement /tmp/requirements/requirements-gpu-source.txt \
    && rm -rf /tmp/requirements

# apex's C++/CUDA extensions (fused_weight_gradient_mlp_cuda for gradient-accumulation fusion, amp_C, fused layer norm)
# for this torch; apex's setup.py refuses an nvcc whose version differs from torch.version.cuda.
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
# hadolint ignore=DL3059
RUN APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD="${MAX_JOBS}" NVCC_APPEND_FLAGS="--threads 2" \
        pip install --no-cache-dir --no-deps --no-build-isolation \
        "apex @ https://github.com/NVIDIA/apex/archive/${APEX_COMMIT}.tar.gz"

# Load every compiled extension (not just find it): no GPU and no driver at build time, so libcuda/libnvidia-ml come
# from the toolkit's stubs, for this step only (the stubs must never shadow the real driver at run time).
COPY launch/docker/check_image.py /tmp/check_image.py
# hadolint ignore=DL3059
RUN mkdir /tmp/cuda-stubs \
    && ln -s "${CUDA_HOME}/lib64/stubs/libcuda.so" /tmp/cuda-stubs/libcuda.so.1 \
    && ln -s "${CUDA_HOME}/lib64/stubs/libnvidia-ml.so" /tmp/cuda-stubs/libnvidia-ml.so.1 \
    && LD_LIBRARY_PATH="/tmp/cuda-stubs:${CUDA_HOME}/lib64/stubs" python /tmp/check_image.py \
    && rm -rf /tmp/cuda-stubs /tmp/check_image.py

WORKDIR /opt/megatron-a3po
COPY --chown=a3po:a3po pyproject.toml README.md ./
COPY --chown=a3po:a3po megatron_a3po ./megatron_a3po
COPY --chown=a3po:a3po checkpoints_tools ./checkpoints_tools
# --no-deps: every dependency is already in place, from the lock.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info
COPY --chown=a3po:a3po launch ./launch
COPY --chown=a3po:a3po configs ./configs

USER ${UID}:${UID}
CMD ["bash"]
