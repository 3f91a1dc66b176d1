"""Megatron model checkpoints: megatron-core dist_checkpointing (torch_dist) plus a small metadata file.

Layout of a converted checkpoint directory:
    metadata.json, .metadata, *.distcp   the dist_checkpointing (torch_dist) checkpoint of the GPTModel chunks
    a3po_metadata.json                   family, ModelArch, the original HF config.json, dtype, vocab padding
    hf/                                  tokenizer, chat template, generation config ... copied from the HF dir

The sharded state dict comes from GPTModel's own `sharded_state_dict()`: tensors are stored with their global
shapes (layers stacked along a leading axis, TP shards placed at their global offsets), so a checkpoint saved
at one TP/PP loads at any other. Word embeddings / output layer are "flexible" in megatron-core: a different
vocab padding at load time keeps the overlap and zero-fills the rest.

One checkpoint serves both layer specs. The weight keys agree (megatron-core's local GPT spec maps
input_layernorm / pre_mlp_layernorm onto TE's fused `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`
through `sharded_state_dict_keys_map`), but the `_extra_state` objects do not: Transformer Engine's norms
(final_layernorm, q/k_layernorm) carry one (FP8 metadata, empty without FP8), the local norms none. So the load
lets exactly `_extra_state` keys differ, in either direction, and nothing else: a converted or CPU-saved
checkpoint loads into the TE spec (its norms keep a fresh, empty extra state), a GPU checkpoint loads into the
local spec on a CPU box (the stored extra state is not read), and extra state present on both sides is restored.

Saving on CPU without forking: megatron-core's torch_dist writer hands its write results back through a
`multiprocessing.Manager().Queue()` created with the *spawn* start method, even for a synchronous save. Spawn
starts a manager server process that re-imports the launching script (`__main__`); a script without the
`if __name__ == "__main__":` guard re-runs itself there and the save fails or hangs. A synchronous save runs
the writer in this process, so `save_model` hands it an ordinary in-process queue instead: no extra process,
nothing re-imported (the CLI entry points keep the guard anyway).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
from dataclasses import dataclass
from pathlib import Path

from megatron_a3po.errors import UserError
from megatron_a3po.models.families import ModelArch, arch_from_hf_config
from megatron_a3po.models.hf_mapping import unwrap

METADATA_FILE = "a3po_metadata.json"
HF_FILES_DIR = "hf"
FORMAT = "megatron-a3po/torch_dist"
FORMAT_VERSION = 1


class MegatronCheckpointError(UserError, ValueError):
    """A Megatron checkpoint directory that cannot be used; the message names the problem and the fix."""


@dataclass
class CheckpointMeta:
    arch: ModelArch
    hf_config: dict  # the source config.json, verbatim
    dtype: str  # params dtype of the stored tensors: float32 | bfloat16 | float16
    padded_vocab_size: int
    make_vocab_size_divisible_by: int
    saved_tensor_parallel_size: int = 1
    saved_pipeline_parallel_size: int = 1
    hf_files: tuple[str, ...] = ()

    def to_json(self) -> str:
        data = {"format": FORMAT, "version": FORMAT_VERSION, "family": self.arch.family,
                "arch": self.arch.to_dict(), "hf_config": self.hf_config, "dtype": self.dtype,
                "padded_vocab_size": self.padded_vocab_size,
                "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
                "saved_tensor_parallel_size": self.saved_tensor_parallel_size,
                "saved_pipeline_parallel_size": self.saved_pipeline_parallel_size,
                "hf_files": list(self.hf_files)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def write(self, ckpt_dir: str | Path) -> None:
        (Path(ckpt_dir) / METADATA_FILE).write_text(self.to_json())


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    """Read and cross-check a3po_metadata.json; refuse anything inconsistent."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / METADATA_FILE
    if not ckpt_dir.is_dir():
        raise MegatronCheckpointError(f"--megatron-path {ckpt_dir}: no such directory")
    if not path.is_file():
        raise MegatronCheckpointError(
            f"{path} not found: {ckpt_dir} is not a checkpoint written by `a3po-convert hf-to-megatron` "
            "(or the conversion was interrupted); convert the HF model again"
        )
    if not (ckpt_dir / "metadata.json").is_file() or not (ckpt_dir / ".metadata").is_file():
        raise MegatronCheckpointError(f"{ckpt_dir}: the dist_checkpointing files (metadata.json, .metadata) are "
                                      "missing; the checkpoint is incomplete, convert the HF model again")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise MegatronCheckpointError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
        if data.get("version", 0) > FORMAT_VERSION:
            raise MegatronCheckpointError(f"{path}: written by a newer megatron-a3po (format version "
                                          f"{data['version']} > {FORMAT_VERSION}); upgrade megatron-a3po")
        arch = ModelArch.from_dict(data["arch"])
        meta = CheckpointMeta(arch=arch, hf_config=data["hf_config"], dtype=data["dtype"],
                              padded_vocab_size=int(data["padded_vocab_size"]),
                              make_vocab_size_divisible_by=int(data["make_vocab_size_divisible_by"]),
                              saved_tensor_parallel_size=int(data.get("saved_tensor_parallel_size", 1)),
                              saved_pipeline_parallel_size=int(data.get("saved_pipeline_parallel_size", 1)),
                              hf_files=tuple(data.get("hf_files", ())))
    except (ValueError, KeyError, TypeError) as err:
        if isinstance(err, MegatronCheckpointError):
            raise
        raise MegatronCheckpointError(f"{path}: unreadable metadata ({err!r}); convert the HF model again") from None
    differences = arch_differences(arch_from_hf_config(meta.hf_config), arch, "its hf_config", "its arch")
    if differences:
        raise MegatronCheckpointError(f"{path} contradicts itself: " + "; ".join(differences)
                                      + ". The file was edited or corrupted; convert the HF model again")
    return meta


# Fields whose disagreement means the weights belong to a different model (dtype and context length do not).
ARCH_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "head_dim", "vocab_size", "rope_theta", "norm_eps", "qkv_bias", "qk_norm", "tie_word_embeddings")


def arch_differences(a: ModelArch, b: ModelArch, a_name: str, b_name: str) -> list[str]:
    return [f"{f}: {a_name} says {getattr(a, f)!r}, {b_name} says {getattr(b, f)!r}"
            for f in ARCH_FIELDS if getattr(a, f) != getattr(b, f)]


def load_padded_vocab(meta: CheckpointMeta, tp: int, divisible_by: int | None = None) -> int:
    """Vocab rows to build the model with at this TP: the stored padding when TP divides it, else a new one."""
    from megatron_a3po.models.families import padded_vocab_size

    if divisible_by is None and meta.padded_vocab_size % tp == 0:
        return meta.padded_vocab_size
    return padded_vocab_size(meta.arch.vocab_size, divisible_by or meta.make_vocab_size_divisible_by, tp)


def sharded_state_dict(chunks) -> dict:
    """The model's own sharded state dict (DDP / Float16Module unwrapped), one sub-dict per chunk."""
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


@contextlib.contextmanager
def _in_process_write_results():
    """See the module docstring: keep megatron's synchronous torch_dist save inside this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = getattr(filesystem_async, "_results_queue", None)
    filesystem_async._results_queue = queue.Queue()
    # megatron-core implements its synchronous save as an "async" request run inline and warns that async save
    # is deprecated; nothing here is async, so that warning would only mislead.
    torch_strategy_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    quiet = _DropMessage("async save is deprecated")
    torch_strategy_log.addFilter(quiet)
    try:
        yield
    finally:
        filesystem_async._results_queue = previous
        torch_strategy_log.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def save_model(chunks, ckpt_dir: str | Path) -> None:
    """Collective: every rank of the model-parallel job calls it with its chunks; `ckpt_dir` must exist, empty."""
    from megatron.core import dist_checkpointing

    with _in_process_write_results():
        dist_checkpointing.save(sharded_state_dict(chunks), str(ckpt_dir))


def load_model(chunks, ckpt_dir: str | Path, arch: ModelArch | None = None) -> None:
    """Collective: fill `chunks` (any TP/PP) from a dist checkpoint, in place; refuse mismatching tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if arch is not None:
        check_vocab_rows(ckpt_dir, arch)
    from torch.distributed.checkpoint.api import CheckpointException

    request = sharded_state_dict(chunks)
    try:
        # RETURN_ALL (megatron/core/dist_checkpointing/validation.py, validate_integrity_and_strict_load): requested
        # keys absent from the checkpoint are dropped from the request and returned as "unexpected"; checkpoint
        # keys nobody requested are returned as "missing" (over all ranks). _check_keys judges them.
        loaded, missing, unexpected = dist_checkpointing.load(request, str(ckpt_dir),
                                                              strict=StrictHandling.RETURN_ALL)
    except (CheckpointingException, CheckpointException) as err:
        # torch wraps megatron's exception (with per-rank tracebacks): report the innermost reason.
        reasons = [line.split("Exception: ", 1)[1] for line in str(err).splitlines() if "Exception: " in line]
        raise MegatronCheckpointError(
            f"{ckpt_dir}: the stored tensors do not fit the model described by {METADATA_FILE}: "
            f"{reasons[-1] if reasons else err}. The checkpoint and its metadata disagree; convert the HF model again"
        ) from None
    _check_keys(ckpt_dir, stored_only=missing, model_only=unexpected)
    states = [loaded] if len(chunks) == 1 else [loaded[f"model{i}"] for i in range(len(chunks))]
    for chunk, state in zip(chunks, states):
        not_restored, unknown = unwrap(chunk).load_state_dict(state, strict=False)
        not_restored = [k for k in not_restored if not k.endswith(EXTRA_STATE_SUFFIX)]
        if not_restored or unknown:
            raise MegatronCheckpointError(f"{ckpt_dir}: parameters not restored {not_restored}, unknown {unknown}")


# torch.nn.Module stores get_extra_state() under `<module prefix>_extra_state` (torch's _EXTRA_STATE_KEY_SUFFIX);
# megatron-core wraps it in a ShardedObject of that key (transformer/utils.py make_sharded_tensors_for_checkpoint).
EXTRA_STATE_SUFFIX = "._extra_state"


def _check_keys(ckpt_dir, stored_only, model_only) -> None:
    """Refuse a key mismatch between checkpoint and model unless every differing key is a module's extra state
    (TE spec vs local spec: see the module docstring)."""
    stored_only = sorted(k for k in stored_only if not k.endswith(EXTRA_STATE_SUFFIX))
    model_only = sorted(k for k in model_only if not k.endswith(EXTRA_STATE_SUFFIX))
    if not stored_only and not model_only:
        return
    problems = ([f"stored but not in the model: {_some(stored_only)}"] if stored_only else []) + \
        ([f"in the model but not stored: {_some(model_only)}"] if model_only else [])
    raise MegatronCheckpointError(
        f"{ckpt_dir}: the checkpoint's keys do not fit the model described by {METADATA_FILE} ("
        + "; ".join(problems) + "). It was written for another model or by another tool; convert the HF model "
        "again (a3po-convert hf-to-megatron)")


def _some(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_vocab_rows(ckpt_dir: str | Path, arch: ModelArch) -> None:
    """Vocab tensors are loaded leniently by megatron-core (padding may differ), so check them here."""
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in stored:
            rows, hidden = stored[key].global_shape
            if rows < arch.vocab_size or hidden != arch.hidden_size:
                raise MegatronCheckpointError(
                    f"{ckpt_dir}: stored {key} has shape {[rows, hidden]} but {METADATA_FILE} describes vocab "
                    f"{arch.vocab_size} x hidden {arch.hidden_size}; the checkpoint and its metadata disagree"
                )
        elif key.startswith("embedding"):
            raise MegatronCheckpointError(f"{ckpt_dir}: no {key} stored; the checkpoint is incomplete")
