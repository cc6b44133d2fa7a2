"""The checkpoint-source protocol: list tensors, resolve names, read regions as exact float values.

A :class:`Source` is an opened checkpoint (one backend per format: ``source_safetensors``,
``source_torch``, ``source_gguf``, ``source_npy``, ``source_sharded``;
:func:`prismoe_store.sources.checkpoint.open_source` picks one). It lists its tensors
(:class:`~prismoe_store.sources.records.TensorInfo`), knows what
the checkpoint says about itself (:class:`~prismoe_store.sources.records.CheckpointFacts`),
resolves aliases with a reason (:mod:`prismoe_store.sources.resolve`) and reads any rectangular region of
a 2-D tensor as float32 (float64 for float64 tensors) with scales applied (:mod:`prismoe_store.sources.scales`).

Every read maps only the bytes it needs and drops them before returning, so pages touched in
the source never pile up in the process's resident memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from prismoe_store.errors import SourceError, TensorNotFoundError
from prismoe_store.sources.records import (
    FINGERPRINT_METHOD,
    BlockScale,
    CheckpointFacts,
    Resolution,
    SourceStamp,
    TensorInfo,
)
from prismoe_store.sources.resolve import head_bias, listing, resolve
from prismoe_store.sources.scales import apply_scale, find_scale

PIECE_BYTES = 4 * 2**20  # source rows one backend call maps at most; unmapped before the next call
SMALL_VALUES = 2**26  # elements read_array() reads whole at most (biases, scale grids)
STAMP_WINDOWS, STAMP_ROWS = 16, 16  # the fingerprint hashes this many windows of this many rows

FLOAT_DTYPES = {  # source dtype -> the dtype its exact values are read as (and --dtype source stores)
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "float32", "F8_E4M3": "float32",
    "F8_E5M2": "float32", "float64": "float64", "float32": "float32", "float16": "float16",
    "bfloat16": "float32", "float8_e4m3fn": "float32", "float8_e5m2": "float32",
    "float8_e4m3fnuz": "float32", "float8_e5m2fnuz": "float32",
}


class Source(ABC):
    """An opened checkpoint: list tensors, resolve names, read regions of 2-D tensors as floats."""

    format: str = ""  # short format name recorded in the store ("safetensors", "gguf", ...)

    def __init__(self, path: str | os.PathLike, facts: CheckpointFacts | None = None):
        self.path = str(path)  # the file (or index/folder) the source was opened from
        self.facts = facts or CheckpointFacts()  # what the checkpoint says about itself
        self._scales: dict[str, BlockScale | None] = {}
        self._small: dict[str, np.ndarray] = {}

    # -- what a backend provides --
    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, by name."""

    @abstractmethod
    def files(self) -> list[str]:
        """Every file read as this checkpoint (for its recorded size)."""

    @abstractmethod
    def read_stored(self, name: str, rows: slice, cols: slice):
        """The backend's read: region of 2-D tensor ``name`` (an exact tensor name; bounds already
        checked) as stored, before scales: a numpy array or torch tensor, possibly a view of a memory
        map that the caller copies and then drops (which unmaps it). Readers call :meth:`read`."""

    @abstractmethod
    def read_stored_all(self, name: str):
        """The backend's read of a whole (small) tensor of any rank, as stored: a numpy array or torch
        tensor. Readers call :meth:`read_array`."""

    def value_dtype(self, source_dtype: str) -> str | None:
        """The dtype a source dtype's exact values are read as (``None``: not floating point)."""
        return FLOAT_DTYPES.get(source_dtype)

    # -- names --
    def info(self, name: str) -> TensorInfo:
        """The tensor called exactly ``name``."""
        found = self.tensors().get(name)
        if found is None:
            raise TensorNotFoundError(f"no tensor {name!r} in {self.path}; it has {listing(self.tensors(), near=name)}")
        return found

    def resolution(self, name: str) -> Resolution:
        """Which tensor ``name`` (a tensor name or the alias ``lm_head``/``embedding``) stands for, and why."""
        return resolve(self.tensors(), name, self.facts, self.path)

    def resolve(self, name: str) -> TensorInfo:
        """The tensor :meth:`resolution` chooses."""
        return self.info(self.resolution(name).tensor)

    def matrix(self, name: str) -> TensorInfo:
        """Like :meth:`resolve`, and check that the tensor is a 2-D float matrix whose values can be read
        exactly (scales found and applicable)."""
        info = self.resolve(name)
        if not info.is_matrix:
            raise SourceError(
                f"tensor {info.name!r} in {self.path} has shape {info.shape}: only 2-D matrices can be tiled")
        self.scale_of(info.name)  # refuses packed formats before the dtype check names them badly
        if self.value_dtype(info.dtype) is None:
            raise SourceError(f"tensor {info.name!r} in {self.path} has dtype {info.dtype}, not a floating-point type")
        return info

    def bias_of(self, resolution: Resolution) -> str | None:
        """The bias added to the outputs of the matrix ``resolution`` chose (``lm_head.bias``), or ``None``."""
        return head_bias(self.tensors(), resolution)

    def scale_of(self, name: str) -> BlockScale | None:
        """How tensor ``name``'s stored values are scaled (``None``: not scaled)."""
        if name not in self._scales:
            self._scales[name] = find_scale(self.tensors(), name, self.facts, self.path)
        return self._scales[name]

    def stored_dtype(self, name: str) -> str:
        """The dtype ``--dtype source`` stores tensor ``name`` as (float32 for bf16, fp8, quants, scaled)."""
        dtype = self.value_dtype(self.info(name).dtype)
        if dtype is None:
            raise SourceError(f"tensor {name!r} in {self.path} is not floating point")
        return "float32" if self.scale_of(name) is not None else dtype

    # -- values --
    def read(self, name: str, rows: slice, cols: slice | None = None) -> np.ndarray:
        """Region ``[rows, cols]`` of 2-D tensor ``name`` (a tensor name, or an alias :meth:`resolve`
        resolves) as a C-contiguous float32 array (float64 for unscaled float64 tensors), scales applied."""
        info = self.tensors().get(name) or self.resolve(name)
        name = info.name
        rows, cols = clip_slice(rows, info.shape[0]), clip_slice(cols or slice(None), info.shape[1])
        scale = self.scale_of(name)
        wide = scale is None and self.value_dtype(info.dtype) == "float64"
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), np.float64 if wide else np.float32)
        step = max(1, PIECE_BYTES // (4 * info.shape[1]))  # whole source rows per backend call
        with reading(self.path, self.format):
            for r in range(rows.start, rows.stop, step):
                piece = slice(r, min(r + step, rows.stop))
                copy_into(out[r - rows.start:piece.stop - rows.start], self.read_stored(info.name, piece, cols))
        if scale is not None and out.size:
            apply_scale(out, self.read_array(scale.tensor), scale.block, rows, cols)
        return out

    def read_array(self, name: str) -> np.ndarray:
        """A whole small tensor (a bias, a scale grid) as float32, in its own shape; cached."""
        if name not in self._small:
            info = self.info(name)
            if int(np.prod(info.shape, dtype=np.int64)) > SMALL_VALUES:
                raise SourceError(f"tensor {name!r} in {self.path} is too big to read whole")
            if self.value_dtype(info.dtype) is None:
                raise SourceError(f"tensor {name!r} in {self.path} has dtype {info.dtype}, not a floating-point type")
            out = np.empty(info.shape, np.float32)
            with reading(self.path, self.format):
                copy_into(out, self.read_stored_all(name))
            self._small[name] = out
        return self._small[name]

    # -- provenance --
    def size(self) -> int:
        """Bytes of every file read as this checkpoint."""
        return sum(os.path.getsize(f) for f in self.files())

    def stamp(self, name: str, bias: str | None = None) -> SourceStamp:
        """Path, size and content fingerprint of tensor ``name`` (and its bias) in this checkpoint.

        The fingerprint hashes the tensor's name, shape and dtype and the values, as read, of
        :data:`STAMP_WINDOWS` evenly spaced windows of :data:`STAMP_ROWS` rows (the first and last
        rows included), plus the whole bias: a fixed, small read whatever the matrix size.
        """
        info = self.info(name)
        h = hashlib.sha256(json.dumps([info.name, list(info.shape), info.dtype]).encode())
        rows = info.shape[0]
        window = min(STAMP_ROWS, rows)
        for start in sorted({int(s) for s in np.linspace(0, rows - window, STAMP_WINDOWS).round()}):
            h.update(self.read(name, slice(start, start + window)).tobytes())
        if bias is not None:
            h.update(self.read_array(bias).tobytes())
        return SourceStamp(self.path, self.size(), "sha256:" + h.hexdigest(), FINGERPRINT_METHOD)


def clip_slice(s: slice, n: int) -> slice:
    """``s`` as ``slice(start, stop)`` within ``0..n`` (step 1 only)."""
    start, stop, step = s.indices(n)
    if step != 1 or stop < start:
        raise SourceError(f"cannot read region {s} of a dimension of {n}")
    return slice(start, stop)


def copy_into(out: np.ndarray, block) -> None:
    """Copy a numpy or torch block (any float dtype) into ``out``, converting exactly on the way."""
    if isinstance(block, np.ndarray):
        out[...] = block
    else:  # a torch tensor (bf16, fp8, torch checkpoints)
        import torch

        torch.from_numpy(out).copy_(block.reshape(out.shape))


@contextmanager
def reading(path: str, what: str) -> Iterator[None]:
    """Turn whatever a format library raises on a damaged file into a one-line SourceError."""
    try:
        yield
    except (SourceError, MemoryError):
        raise
    except FileNotFoundError:
        raise SourceError(f"no such file: {path}") from None
    except Exception as e:  # noqa: BLE001 - format libraries raise anything on corrupt input
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise SourceError(f"cannot read {path} as {what} (truncated or corrupt?): {msg}") from None
