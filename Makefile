# One command each: `make test` (set up .venv if needed, run the whole suite) and `make demo` (the main job).
SHELL := /bin/bash
VENV_STAMP := .venv/.installed
PYTEST_ARGS ?=

.PHONY: test test-fast demo compare faults setup clean docker-check docker-requirements gpu-wheels

$(VENV_STAMP): pyproject.toml uv.lock launch/setup_env.sh
	bash launch/setup_env.sh
	touch $@

setup: $(VENV_STAMP)

# Two pytest workers (pytest-xdist), one module per worker at a time: multi-process tests leave CPU idle while
# ranks wait on each other, which the other worker fills. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
test: $(VENV_STAMP)
	.venv/bin/python -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The unit tests only (no multi-rank jobs: tests/conftest.py marks them), for a quick check while editing.
test-fast: $(VENV_STAMP)
	.venv/bin/python -m pytest tests -m "not distributed" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: $(VENV_STAMP)
	bash launch/demo.sh

# The polarity study (`a3po compare` with its defaults: --study polarity, psr,nsr,dapo,a3po x seeds 1,2 x 20 steps on
# synthetic level 6, from the embedded warm start; 10-24 minutes on 2 cores) into runs/compare: compare.png,
# compare_token_probs.png, compare.md, compare.json. Resumable: finished runs are skipped on a rerun.
# COMPARE_ARGS adds flags (e.g. COMPARE_ARGS="--study token-grid" or "--seeds 1,2,3 --train-steps 30").
COMPARE_ARGS ?=
compare: $(VENV_STAMP)
	.venv/bin/a3po compare --output runs/compare $(COMPARE_ARGS)

# The training fault battery: a real 2-rank job SIGKILLed at 10 random moments, each resumed and compared bitwise
# with an uninterrupted run (~2-3 minutes per point on 2 cores; the save protocol's kill points are in make test).
faults: $(VENV_STAMP)
	.venv/bin/python tests/fault_battery_training.py 10

# The Docker image's Python set (launch/docker/requirements-gpu*.txt, from uv.lock with hashes) is current, its torch
# is the one vLLM's wheel declares, and it resolves for Python 3.12 on x86_64 Linux: metadata only, no Docker needed.
docker-check:
	bash launch/docker/deps.sh check

docker-requirements:
	bash launch/docker/deps.sh export

# dist/gpu-wheels/ (<= 64 MiB): this package, megatron-core and the rest of what launch/gpu_train_smoke.py needs on a
# GPU machine with Python 3.12 + torch only. There: pip install --no-deps dist/gpu-wheels/*.whl, then run the script.
gpu-wheels: $(VENV_STAMP)
	bash launch/gpu_wheels.sh

clean:
	rm -rf .venv .uv-bootstrap .pytest_cache
