"""A ``.npy`` file holding one matrix as a :class:`~prismoe_store.sources.base.Source`, named by the file stem."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prismoe_store.sources.base import Source, reading
from prismoe_store.sources.records import CheckpointFacts, TensorInfo


class NpySource(Source):
    """A ``.npy`` file, memory-mapped afresh for each read."""

    format = "npy"

    def __init__(self, path, facts: CheckpointFacts | None = None):
        super().__init__(path, facts)
        with reading(self.path, ".npy"):
            arr = np.load(self.path, mmap_mode="r")
            name = Path(self.path).stem
            self._infos = {name: TensorInfo(name, tuple(int(d) for d in arr.shape), arr.dtype.name)}
            del arr

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def files(self) -> list[str]:
        return [self.path]

    def read_stored(self, name, rows, cols):
        return np.load(self.path, mmap_mode="r")[rows, cols]  # a view: unmapped once the caller drops it

    def read_stored_all(self, name):
        return np.array(np.load(self.path, mmap_mode="r"))
