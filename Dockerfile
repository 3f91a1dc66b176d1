# megatron-a3po for GPU clusters:  docker build -t megatron-a3po .   (then launch/docker/run_node.sh on every node)
# Base: NGC PyTorch (CUDA 13, cuDNN, NCCL, Transformer Engine and apex, all built against NGC's own torch). That
# torch stays: replacing it breaks Transformer Engine and apex. On top, with --no-deps, the exact GPU set from
# uv.lock minus what the base provides (launch/docker/requirements-gpu.txt: vLLM 0.32.0 CUDA build, megatron-core
# 0.19.2, transformers, ...). The tag is chosen for torch 2.13 + CUDA 13, the pair vLLM 0.32.0's wheels are built
# for; `make docker-check` resolves the set, and on GPUs the pre-flight check imports vLLM's kernels.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    PYTHON=python \
    HF_HOME=/home/a3po/.cache/huggingface

# Non-root user; build with --build-arg UID=$(id -u) so checkpoints on shared mounts belong to you. Ubuntu 24.04
# images ship a user 'ubuntu' with uid 1000: removed so that uid is free. USER is numeric so hosts resolve it.
ARG UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid "${UID}" a3po \
    && useradd --create-home --uid "${UID}" --gid "${UID}" --shell /bin/bash a3po \
    && mkdir -p /home/a3po/.cache/huggingface /opt/megatron-a3po/runs \
    && chown -R a3po:a3po /home/a3po /opt/megatron-a3po

# Third-party packages first: this layer is reused while only the project's code changes.
COPY launch/docker/requirements-gpu.txt /tmp/requirements-gpu.txt
RUN pip install --no-cache-dir --no-deps --requirement /tmp/requirements-gpu.txt \
    && rm /tmp/requirements-gpu.txt \
    && python -c "import importlib.util as u; missing = [m for m in ('torch', 'transformer_engine', 'apex', \
'megatron.core', 'vllm', 'transformers') if u.find_spec(m) is None]; assert not missing, missing"

WORKDIR /opt/megatron-a3po
COPY --chown=a3po:a3po pyproject.toml README.md ./
COPY --chown=a3po:a3po megatron_a3po ./megatron_a3po
COPY --chown=a3po:a3po checkpoints_tools ./checkpoints_tools
# --no-deps: every dependency is already in place, and pyproject's exact torch pin must not replace NGC's torch.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info
COPY --chown=a3po:a3po launch ./launch
COPY --chown=a3po:a3po configs ./configs

USER ${UID}:${UID}
CMD ["bash"]
