"""Suite-wide test configuration.

`make test` runs the suite in two pytest workers (pytest-xdist, `--dist loadfile`: a module's tests, and so its
module-scoped fixtures, stay in one worker). Modules that start multi-process jobs are scheduled first, longest
first, so the two workers finish at about the same time; the many second-long unit tests fill in at the end.
Those modules' tests are marked `distributed`, the others `unit`: `make test-fast` runs `-m "not distributed"`.

Helpers shared by several modules (training jobs under torchrun, their outputs, the tiny and paper-config runs,
fake checkpoints) live in tests/helpers.py (`from helpers import ...`); no test module imports another.
"""

from __future__ import annotations

# Measured wall time on 2 CPU cores, longest first.
MULTI_PROCESS_MODULES = [
    "test_compare.py", "test_guards.py", "test_checkpoint_resume.py", "test_train_layouts.py", "test_paper_configs.py",
    "test_eval_cli.py", "test_parallel_parity.py", "test_launch_multinode.py", "test_convert.py",
    "test_gpu_smoke.py",
    "test_rollout_shm.py", "test_rollout_groups.py", "test_packing.py", "test_rollout_refit.py", "test_optimizer_dp.py",
    "test_cuda_emulation.py", "test_platform.py", "test_config.py", "test_algorithms_aggregation.py",
    "test_logprobs.py", "test_extra_state_portability.py", "test_memory_handoff.py", "test_ports.py",
]


# test_faults also starts processes (a 2-rank spawn, killed savers) but balances the workers best scheduled late.
DISTRIBUTED = set(MULTI_PROCESS_MODULES) | {"test_faults.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: in a module that starts multi-rank jobs (make test-fast skips)")
    config.addinivalue_line("markers", "unit: in-process or short single-process tests (make test-fast runs them)")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(MULTI_PROCESS_MODULES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: order within a module kept
    for item in items:
        item.add_marker("distributed" if item.path.name in DISTRIBUTED else "unit")
