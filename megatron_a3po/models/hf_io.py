"""Hugging Face checkpoint files: a validating safetensors reader, a streaming sharded writer, side files.

The safetensors format is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`) and one flat data region.
Reading and writing it directly (instead of through `safe_open`/`save_file`) gives three things the converter
needs: a truncated or inconsistent file is detected from its header before any tensor is used; a tensor is
read straight into its destination buffer (no mmap pages counted against the process); and a sharded
checkpoint is written tensor by tensor, so memory stays at one tensor however large the model is.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_a3po.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weight files never copied as side files (tokenizer, generation config, chat template ... are).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class HFCheckpointError(UserError, ValueError):
    """A Hugging Face checkpoint that cannot be used as is; the message names the file and the fix."""


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size at open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        redownload = "re-download or re-copy the checkpoint"
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open for reads; close()
        except OSError as err:
            raise HFCheckpointError(f"{self.path}: cannot open ({err.strerror})") from None
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            self.close()
            raise HFCheckpointError(f"{self.path}: truncated ({size} bytes, not even a header); {redownload}")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            self.close()
            raise HFCheckpointError(f"{self.path}: header claims {header_len} bytes but the file has {size}: "
                                    f"truncated or not a safetensors file; {redownload}")
        try:
            header = json.loads(self._file.read(header_len))
        except ValueError:
            self.close()
            raise HFCheckpointError(f"{self.path}: corrupt safetensors header (not JSON); {redownload}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_of_data = 0
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            begin, end = info.get("data_offsets", (0, -1))
            shape = tuple(info.get("shape", ()))
            if dtype is None or end - begin != _nbytes(shape, dtype):
                self.close()
                raise HFCheckpointError(f"{self.path}: tensor {name} has an inconsistent header entry {info}; "
                                        f"{redownload}")
            self.tensors[name] = (dtype, shape, begin, end)
            end_of_data = max(end_of_data, end)
        if size < self._data_start + end_of_data:
            self.close()
            raise HFCheckpointError(
                f"{self.path}: truncated: its header needs {self._data_start + end_of_data} bytes but the file has "
                f"{size}; {redownload}"
            )

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read into `out` if given (contiguous CPU, same shape and dtype) or a new tensor."""
        dtype, shape, begin, end = self.tensors[name]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            got = os.preadv(self._file.fileno(), [view], self._data_start + begin)
            if got != end - begin:
                raise HFCheckpointError(f"{self.path}: short read of {name} (file changed while reading?)")
        return out

    def close(self) -> None:
        self._file.close()


class HFWeights:
    """Lazy, name-addressed access to an HF checkpoint's tensors (single file or sharded with an index).

    Opening reads every shard's header: missing shards, truncated files and index entries that point at a
    shard without that tensor are refused here, before any conversion starts.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise HFCheckpointError(f"{index}: not a valid safetensors index (no weight_map); "
                                        "re-download the checkpoint") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.glob("*") if p.name.endswith(WEIGHT_SUFFIXES))
            hint = f" (found {found}; convert them to safetensors first)" if found else ""
            raise HFCheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise HFCheckpointError(f"{self.path}: shard(s) {missing} listed in {INDEX_FILE} are missing; "
                                    "re-download the checkpoint (all shards)")
        self._files: dict[str, SafetensorsFile] = {}
        try:
            for f in files:
                self._files[f] = SafetensorsFile(self.path / f)
        except HFCheckpointError:
            self.close()
            raise
        if weight_map is None:
            weight_map = {name: SINGLE_FILE for name in self._files[SINGLE_FILE].tensors}
        for name, f in weight_map.items():
            if name not in self._files[f].tensors:
                self.close()
                raise HFCheckpointError(f"{self.path / f}: {INDEX_FILE} says it holds {name} but it does not "
                                        "(shards from different downloads?); re-download the checkpoint")
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self.weight_map[name]].tensors[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._files[self.weight_map[name]].tensors[name][0]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        return self._files[self.weight_map[name]].read(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read `name` into `out` in place (cast if `out` has another dtype); the shapes must be equal."""
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        if tuple(out.shape) != tuple(self.shape(name)):
            raise HFCheckpointError(f"{self.path}: tensor {name} has shape {list(self.shape(name))}, "
                                    f"expected {list(out.shape)}; config.json and the weights disagree")
        if out.dtype == self.dtype(name) and out.is_contiguous() and out.device.type == "cpu":
            self._files[self.weight_map[name]].read(name, out)
        else:
            out.copy_(self.get(name))

    def total_bytes(self) -> int:
        return sum(_nbytes(self.shape(n), self.dtype(n)) for n in self.weight_map)

    def validate(self, expected: Iterable[tuple[str, tuple[int, ...]]], ignorable: Sequence[str] = ()) -> None:
        """Every expected tensor present with its expected shape, nothing unexpected (bar `ignorable` suffixes)."""
        expected = dict(expected)
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise HFCheckpointError(f"{self.path}: missing tensor(s) {shown}: config.json describes a model these "
                                    "weights do not contain; re-download or fix config.json")
        for name, shape in expected.items():
            if tuple(self.shape(name)) != tuple(shape):
                raise HFCheckpointError(
                    f"{self.path}: tensor {name} has shape {list(self.shape(name))} but config.json implies "
                    f"{list(shape)}; the config and the weights disagree (wrong config.json?)"
                )
        extra = [n for n in self.weight_map if n not in expected and not n.endswith(tuple(ignorable))]
        if extra:
            shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
            raise HFCheckpointError(f"{self.path}: unexpected tensor(s) {shown} that the converter has no mapping "
                                    "for; converting would silently drop them. Is the architecture right?")

    def dominant_dtype(self) -> torch.dtype:
        """The dtype most of the bytes are stored in (the checkpoint's own precision)."""
        by_dtype: dict[torch.dtype, int] = {}
        for n in self.weight_map:
            by_dtype[self.dtype(n)] = by_dtype.get(self.dtype(n), 0) + _nbytes(self.shape(n), self.dtype(n))
        return max(by_dtype, key=by_dtype.get)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1GiB' / '12345' -> bytes (HF's max_shard_size spelling)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a byte count")


class ShardedSafetensorsWriter:
    """Writes a planned list of tensors as HF-style shards, one tensor at a time.

    The plan (name, shape, dtype) is known up front, so each shard's header is written before its data and
    tensors stream straight to disk; `write` refuses a tensor that is out of order or has the wrong shape or
    dtype. One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` plus the index.
    """

    def __init__(self, out_dir: str | Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9):
        self.out_dir = Path(out_dir)
        self.plan = [(n, tuple(s), d) for n, s, d in plan]
        self.shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(self.plan):
            nbytes = _nbytes(shape, dtype)
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(i)
            size += nbytes
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._next = 0
        self._shard = -1
        self._handle = None

    def _open_shard(self, k: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self.shards[k]:
            name, shape, dtype = self.plan[i]
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data region 8-byte aligned, as the reference writer does
        self._handle = open(self.out_dir / self.files[k], "wb")  # noqa: SIM115 - closed when the shard is full
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise ValueError(f"unexpected extra tensor {name}: all {len(self.plan)} planned tensors are written")
        want_name, want_shape, want_dtype = self.plan[self._next]
        if name != want_name or tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise ValueError(f"tensor {self._next}: got {name} {list(tensor.shape)} {tensor.dtype}, "
                             f"planned {want_name} {list(want_shape)} {want_dtype}")
        k = next(k for k, idx in enumerate(self.shards) if self._next in idx)
        if k != self._shard:
            self._open_shard(k)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._next += 1
        if self._next == self.shards[k][-1] + 1:
            self._handle.flush()
            os.fsync(self._handle.fileno())  # on disk before the output directory is renamed into place
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._next != len(self.plan):
            raise ValueError(f"only {self._next} of {len(self.plan)} planned tensors were written "
                             f"(next expected: {self.plan[self._next][0]})")
        if len(self.files) > 1:
            weight_map = {self.plan[i][0]: self.files[k] for k, idx in enumerate(self.shards) for i in idx}
            total = sum(_nbytes(s, d) for _, s, d in self.plan)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def side_files(hf_dir: str | Path) -> list[Path]:
    """Top-level files of an HF model dir that are not weights and not config.json (tokenizer, chat template ...)."""
    return sorted(p for p in Path(hf_dir).iterdir()
                  if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in WEIGHT_INDEXES
                  and p.name != "config.json" and not p.name.startswith("."))


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in side_files(src_dir):
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied
