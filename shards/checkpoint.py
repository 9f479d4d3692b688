"""Read tensors, or only a rank's slice of them, from a Hugging Face safetensors checkpoint.

Handles a single `model.safetensors` and the sharded layout with `model.safetensors.index.json`.
Slices are read through safetensors' lazy `get_slice`, so a rank reads only its part of each tensor.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointReader:
    """Name -> tensor (or tensor slice) lookups over the safetensors files of one checkpoint.

    `device` is where the loaded parameters go; tensors are read on the CPU, one at a time.
    """

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = self.model_dir / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
            with safe_open(single, framework="pt") as f:
                weight_map = {name: single.name for name in f.keys()}
        self.weight_map = weight_map
        self._files: dict[str, object] = {}
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        filename = self.weight_map[name]
        if filename not in self._files:
            self._files[filename] = safe_open(self.model_dir / filename, framework="pt")
        return self._files[filename]

    def shape(self, name: str) -> list[int]:
        """The full shape of tensor `name` on disk."""
        return list(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows/columns [start, end) of dimension `dim` when `dim` is given."""
        lazy = self._file(name).get_slice(name)
        if dim is None:
            tensor = lazy[:]
        else:
            index = [slice(None)] * len(lazy.get_shape())
            index[dim] = slice(start, end)
            tensor = lazy[tuple(index)]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        """Release the open files (their memory maps)."""
        self._files.clear()
