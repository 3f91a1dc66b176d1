"""What every a3po-convert subcommand shares: errors, rank launching, atomic output dirs, peak memory.

Launching: a subcommand needing TP x PP ranks
- under torchrun (RANK and WORLD_SIZE in the environment) runs its rank function in this process, and requires
  WORLD_SIZE == TP x PP;
- otherwise, with one rank, runs it in this process (a 1-rank gloo/nccl group, torn down afterwards);
- otherwise starts TP x PP local ranks itself (megatron_a3po.spawn.run_in_ranks): no torchrun needed.
Rank functions are module-level and return their result on global rank 0 (None elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from megatron_a3po.errors import UserError


class ConvertError(UserError):
    """A refused input: the message names the problem and the fix. The CLI prints it and exits 2."""


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_over_ranks(value: int) -> int:
    from megatron_a3po import parallel

    return int(parallel.all_reduce_scalar(value, op="max"))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class Launcher:
    """Runs a rank function on TP x PP ranks in whichever way this process was started (module docstring)."""

    def __init__(self, tp: int, pp: int, timeout: float = 24 * 3600.0):
        self.tp, self.pp, self.world = tp, pp, tp * pp
        self.timeout = timeout
        self.torchrun = under_torchrun()
        self.rank = 0
        if self.torchrun:
            world = int(os.environ["WORLD_SIZE"])
            if world != self.world:
                raise ConvertError(
                    f"launched with WORLD_SIZE={world} but --tensor-model-parallel-size {tp} x "
                    f"--pipeline-model-parallel-size {pp} = {self.world}; launch exactly {self.world} ranks "
                    "(or run the command without torchrun: it starts its own ranks)"
                )
            from megatron_a3po import parallel

            parallel.init_distributed()
            self.rank = parallel.rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's value on every rank (only needed under torchrun)."""
        if not self.torchrun or self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.torchrun and self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def run(self, fn: Callable, args: Sequence[Any]) -> Any:
        if self.torchrun:
            return fn(*args)
        if self.world == 1:
            return _run_in_process(fn, args)
        from megatron_a3po.spawn import run_in_ranks

        return run_in_ranks(fn, self.world, args, timeout=self.timeout)[0]  # a rank's UserError is re-raised


def _run_in_process(fn: Callable, args: Sequence[Any]) -> Any:
    """A 1-rank job in this process; the environment and process group are restored afterwards."""
    from megatron_a3po import parallel

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="0")  # one rank: its store binds a port the OS picks, at once
    try:
        parallel.init_distributed()
        return fn(*args)
    finally:
        parallel.destroy()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_output_dir(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse an existing output (unless --overwrite) and an output that is, contains or lies inside an input."""
    out = output.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ConvertError(f"--output {output} overlaps the input {src}; write the result to a separate directory")
    if out.exists() and not overwrite:
        raise ConvertError(f"--output {output} already exists; pass --overwrite to replace it, or choose a new path")
    if not out.parent.is_dir():
        raise ConvertError(f"--output {output}: parent directory {out.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_output_dir(output: Path, launcher: Launcher | None = None):
    """Yield a fresh hidden temp dir beside `output`; on success rename it to `output`, on any failure delete it.

    A killed conversion leaves only `.NAME.partial-*` (no metadata file, so nothing loads it as a checkpoint).
    Under torchrun, rank 0 owns the directory and the others receive its path.
    """
    output = output.resolve()
    main = launcher is None or launcher.is_main
    tmp = None
    if main:
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the final directory's mode
    if launcher is not None:
        tmp = Path(launcher.share(str(tmp) if tmp else None))
    try:
        yield tmp
        if launcher is not None:
            launcher.barrier()
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not main:
        return
    if output.exists() or output.is_symlink():  # --overwrite was checked by check_output_dir
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / "previous")
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def dtype_flag(name: str | None):
    """--dtype (None: keep the source's) as a torch dtype; a ConvertError naming the choices otherwise."""
    from megatron_a3po import dtypes

    if name is None:
        return None
    try:
        return dtypes.parse_dtype(name)
    except ValueError:
        raise ConvertError(f"--dtype {name!r}: choose bf16, fp16 or fp32") from None


def check_parallel_sizes(arch, tp: int, pp: int) -> None:
    """TP must divide heads and query groups, PP the layers (the same rules, and messages, as training)."""
    from megatron_a3po.config import Config, ConfigError, validate_against_arch

    if tp < 1 or pp < 1:
        raise ConvertError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    cfg = Config()
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    try:
        validate_against_arch(cfg, arch)
    except ConfigError as err:
        raise ConvertError(str(err)) from None


def build_sharded_model(arch, tp: int, pp: int, dtype, padded_vocab: int) -> list:
    """Model-parallel groups + this rank's GPTModel chunk(s), uninitialised (every parameter is loaded next).

    The local (non-Transformer-Engine) layer spec: its weight keys are the TE ones and only TE's `_extra_state`
    keys differ, which megatron_ckpt.load_model lets differ, so the checkpoint loads into either spec.
    """
    from megatron_a3po import parallel
    from megatron_a3po.models import builder

    parallel.init_model_parallel(parallel.ParallelSizes(tensor=tp, pipeline=pp))
    return builder.build_model(arch, padded_vocab=padded_vocab, use_te=False, initialize=False, tp=tp, pp=pp,
                               params_dtype=dtype)[1]


def progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" tensors", disable=not enabled, mininterval=1.0, dynamic_ncols=True)
