"""The refit log filter: vLLM's "Failed to load weights" is dropped for layers no checkpoint fills, nothing else."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from megatron_a3po.rollout import log_filter


# Stand-ins named like vLLM's layers (the warning carries only the class name).
class RotaryEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cos_sin_cache", torch.zeros(4, 2), persistent=False)


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8, 2))


class ParallelLMHead(VocabParallelEmbedding):
    pass


class QKVParallelLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 2))
        self.register_buffer("scale", torch.ones(1))  # persistent: a checkpoint may carry it


class Model(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding()
        self.rotary = RotaryEmbedding()
        self.layers = torch.nn.ModuleList([QKVParallelLinear() for _ in range(2)])
        self.lm_head = ParallelLMHead()
        if tied:
            self.lm_head.weight = self.embed_tokens.weight


def test_nothing_to_load_is_rotary_and_only_a_tied_head():
    assert log_filter.nothing_to_load(Model(tied=True)) == {"RotaryEmbedding", "ParallelLMHead"}
    assert log_filter.nothing_to_load(Model(tied=False)) == {"RotaryEmbedding"}


def test_a_class_with_any_loading_instance_stays_loud():
    model = Model(tied=True)
    model.extra_head = ParallelLMHead()  # untied: its own weight comes from the checkpoint
    assert log_filter.nothing_to_load(model) == {"RotaryEmbedding"}


def test_vllm_emits_the_filtered_message_from_that_logger():
    """Guards against a vLLM upgrade renaming the module or rewording the warning (the filter would go inert)."""
    root = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])  # finds vllm, imports nothing
    source = (root / "model_executor/model_loader/reload/layerwise.py").read_text()
    assert "logger = init_logger(__name__)" in source
    assert log_filter.LAYERWISE_LOGGER == "vllm.model_executor.model_loader.reload.layerwise"
    assert f'logger.warning("{log_filter.FAILED_TO_LOAD}", layer.__class__.__name__)' in source


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def vllm_logger():
    """vLLM's own layerwise logger (logging.getLogger of its module name), capturing what gets past its filters."""
    logger = logging.getLogger(log_filter.LAYERWISE_LOGGER)
    capture, level, propagate = _Capture(), logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep the test's records out of vLLM's console handler
    yield logger, capture.records
    logger.removeHandler(capture)
    logger.setLevel(level)
    logger.propagate = propagate


def test_filter_drops_exactly_the_expected_records(vllm_logger):
    logger, seen = vllm_logger
    f = log_filter.install({"RotaryEmbedding", "ParallelLMHead"})
    try:
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "ParallelLMHead")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")  # another layer: a real failure
        logger.warning("%s: Delayed processing", "RotaryEmbedding")  # another message about a quiet class
        logger.error("%s: Failed to load weights", "RotaryEmbedding")  # another level
        logger.warning("RotaryEmbedding: Failed to load weights")  # preformatted: not vLLM's record
    finally:
        log_filter.uninstall(f)
    logger.warning("%s: Failed to load weights", "RotaryEmbedding")  # uninstalled: passes again
    assert [(r.levelname, r.getMessage()) for r in seen] == [
        ("WARNING", "QKVParallelLinear: Failed to load weights"),
        ("WARNING", "RotaryEmbedding: Delayed processing"),
        ("ERROR", "RotaryEmbedding: Failed to load weights"),
        ("WARNING", "RotaryEmbedding: Failed to load weights"),
        ("WARNING", "RotaryEmbedding: Failed to load weights"),
    ]
