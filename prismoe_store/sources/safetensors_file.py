"""A ``.safetensors`` file as a :class:`~prismoe_store.sources.base.Source`.

Read with ``safe_open(...).get_slice`` (memory-mapped); each read opens its own map and drops it
before returning, so touched pages leave RSS. F16/F32/F64 are read through numpy; BF16 and FP8
through torch (numpy has no such dtypes), converted exactly to float32.
"""

from __future__ import annotations

from prismoe_store.sources.base import Source, reading
from prismoe_store.sources.records import CheckpointFacts, TensorInfo

_NUMPY_DTYPES = ("F16", "F32", "F64")


class SafetensorsSource(Source):
    """One ``.safetensors`` file."""

    format = "safetensors"

    def __init__(self, path, facts: CheckpointFacts | None = None):
        super().__init__(path, facts)
        from safetensors import safe_open

        with reading(self.path, "safetensors"):
            f = safe_open(self.path, framework="numpy")
            self._infos = {k: _info(k, f.get_slice(k)) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def files(self) -> list[str]:
        return [self.path]

    def _open(self, name: str):
        from safetensors import safe_open

        numpy_ok = self._infos[name].dtype in _NUMPY_DTYPES
        return safe_open(self.path, framework="numpy" if numpy_ok else "pt")  # bf16/fp8 need torch

    def read_stored(self, name, rows, cols):
        return self._open(name).get_slice(name)[rows, cols]

    def read_stored_all(self, name):
        return self._open(name).get_tensor(name)


def _info(name: str, sl) -> TensorInfo:
    return TensorInfo(name, tuple(int(d) for d in sl.get_shape()), sl.get_dtype())
