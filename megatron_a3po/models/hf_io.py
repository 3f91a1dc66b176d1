"""Reading Hugging Face safetensors checkpoints tensor by tensor (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class HFCheckpointError(ValueError):
    pass


class HFWeights:
    """Lazy, name-addressed access to an HF checkpoint's tensors; only the requested tensor is read."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise HFCheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise HFCheckpointError(f"{file}: shard listed in the index is missing; re-download the checkpoint")
            try:
                self._handles[name] = safe_open(str(file), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad header
                raise HFCheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {err}") from None
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        self.weight_map = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise HFCheckpointError(f"{self.path}: cannot read {name} ({err}); the shard may be truncated") from None
