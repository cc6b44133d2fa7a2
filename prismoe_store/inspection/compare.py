"""Compare two matrices, streamed block by block, and open matrices and tensors lazily for it.

- :func:`compare_matrices` streams two matrices block by block: max abs diff, relative Frobenius
  error and cosine similarity (a :class:`Comparison`), never a whole matrix in RAM.
- :func:`open_matrix` opens a weights store tensor or a checkpoint tensor (``.safetensors``, HF
  folder, ``.pt``/``.bin``, ``.gguf``, ``.npy``) as a lazily read 2-D array for it;
  :func:`open_tensor` opens a 2-D or 3-D tensor for ``prismoe visualize`` (a weights store
  tensor as its :class:`TileStack`).

>>> import os, tempfile
>>> p = os.path.join(tempfile.mkdtemp(), "w.npy"); np.save(p, np.eye(3, dtype=np.float32))
>>> c = compare_matrices(open_matrix(p).array, np.eye(3) + 1)
>>> c.max_abs_diff, c.shape
(1.0, (3, 3))
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from prismoe_store.errors import DataError, IncompleteStoreError, SourceError, StoreFormatError, TensorNotFoundError
from prismoe_store.grid import GridSpec
from prismoe_store.inspection.common import DEFAULT_MAX_BYTES, ProgressFn, block_shape, chunk_shape, jsonable, pick_name
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import existing_kind
from prismoe_store.stores.verified import reading
from prismoe_store.stores.weights import WeightsStore

# -- comparing two matrices ------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """How far matrix A is from matrix B (B is the reference of the relative error).

    >>> c = compare_matrices(np.ones((2, 2)), np.full((2, 2), 2.0))
    >>> c.max_abs_diff, c.rel_frobenius, c.cosine, c.within(1.0)
    (1.0, 0.5, 1.0, True)
    """

    shape: tuple[int, int]  # shape of both matrices
    max_abs_diff: float  # max |A - B| (NaN when either holds a NaN)
    argmax: tuple[int, int]  # (row, col) of the largest |A - B|
    rel_frobenius: float  # ‖A − B‖_F / ‖B‖_F (0 when both are zero, inf when only B is)
    cosine: float  # <A, B> / (‖A‖_F ‖B‖_F) (1 when both are zero, 0 when only one is)
    norm_a: float  # ‖A‖_F
    norm_b: float  # ‖B‖_F

    def within(self, atol: float) -> bool:
        """True when ``max_abs_diff <= atol`` (never with NaNs)."""
        return bool(self.max_abs_diff <= atol)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return jsonable({"shape": list(self.shape), "max_abs_diff": self.max_abs_diff, "argmax": list(self.argmax),
                          "rel_frobenius": self.rel_frobenius, "cosine": self.cosine,
                          "norm_a": self.norm_a, "norm_b": self.norm_b})


def compare_matrices(a, b, *, max_bytes: int = DEFAULT_MAX_BYTES, progress: ProgressFn | None = None) -> Comparison:
    """Compare two 2-D matrices block by block (both read lazily, accumulated in float64).

    ``a`` and ``b`` are anything sliced like ``m[r0:r1, c0:c1]`` (Zarr arrays, NumPy arrays or
    memory maps, :func:`open_matrix` results). Blocks follow A's (else B's) chunk grid when it
    has one, and hold at most ``max_bytes`` of float64 per matrix (at least one chunk).

    >>> c = compare_matrices(np.eye(3), 2 * np.eye(3))
    >>> c.max_abs_diff, c.rel_frobenius, round(c.cosine, 12)
    (1.0, 0.5, 1.0)
    """
    sa, sb = tuple(a.shape), tuple(b.shape)
    if len(sa) != 2 or len(sb) != 2:
        raise DataError(f"compare needs two 2-D matrices, got shapes {sa} and {sb}")
    if sa != sb:
        raise DataError(f"shape mismatch: A is {sa[0]}×{sa[1]}, B is {sb[0]}×{sb[1]}")
    rows, cols = sa
    step_r, step_c = block_shape(sa, chunk_shape(a) or chunk_shape(b), max_bytes)
    max_abs, argmax = 0.0, (0, 0)
    dd = aa = bb = ab = 0.0
    blocks = [(r0, c0) for r0 in range(0, rows, step_r) for c0 in range(0, cols, step_c)]
    for i, (r0, c0) in enumerate(blocks):
        r1, c1 = min(r0 + step_r, rows), min(c0 + step_c, cols)
        with reading(f"block rows {r0}:{r1}, cols {c0}:{c1}"):
            x = np.array(a[r0:r1, c0:c1], dtype=np.float64)  # a private copy: it becomes |A - B| below
            y = np.asarray(b[r0:r1, c0:c1], dtype=np.float64)
        xf, yf = x.reshape(-1), y.reshape(-1)
        aa, bb, ab = aa + float(xf @ xf), bb + float(yf @ yf), ab + float(xf @ yf)
        np.subtract(xf, yf, out=xf)
        del y, yf
        dd += float(xf @ xf)
        np.abs(xf, out=xf)
        max_abs, argmax = _track_max(xf, x.shape[1], (r0, c0), max_abs, argmax)
        if progress is not None:
            progress(i + 1, len(blocks))
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if nb > 0:
        rel = math.sqrt(dd) / nb
    else:
        rel = 0.0 if dd == 0 else math.inf
    if na > 0 and nb > 0:
        cos = ab / (na * nb)
    else:
        cos = 1.0 if na == nb else 0.0
    return Comparison(shape=sa, max_abs_diff=max_abs, argmax=argmax, rel_frobenius=rel, cosine=cos,
                      norm_a=na, norm_b=nb)


def _track_max(d: np.ndarray, width: int, origin: tuple[int, int], best: float,
               where: tuple[int, int]) -> tuple[float, tuple[int, int]]:
    """Update the running max of ``|A - B|`` (a NaN, once seen, wins for good)."""
    if math.isnan(best) or d.size == 0:
        return best, where
    nan = np.isnan(d)
    k = int(nan.argmax()) if nan.any() else int(d.argmax())
    if nan[k] or d[k] > best:
        return float(d[k]), (origin[0] + k // width, origin[1] + k % width)
    return best, where


# -- opening matrices and tensors ------------------------------------------------------------


@dataclass(frozen=True)
class OpenedArray:
    """A lazily read array and what it is: :func:`open_matrix` / :func:`open_tensor` return one."""

    array: Any  # sliced like a NumPy array: a Zarr array, a memory map, or a lazy reader
    name: str  # the tensor's name where it came from ("" for an adapter's matrix)
    label: str  # "path:tensor", for messages
    grid: GridSpec | None = None  # the store's grid when it came from a weights store
    note: str | None = None  # what a user should know about the name's resolution (a tied head), else None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the array."""
        return tuple(self.array.shape)


def is_store(path) -> bool:
    """True when ``path`` looks like a Zarr store: an fsspec URL or a folder with a ``zarr.json``.

    >>> is_store("memory://x"), is_store("model.npy")
    (True, False)
    """
    path = str(path)
    return "://" in path or os.path.isfile(os.path.join(path, "zarr.json"))


def open_matrix(path, *, tensor: str | None = None, fallback: str | None = None,
                storage_options: dict | None = None, int8: bool = False) -> OpenedArray:
    """Open a 2-D matrix lazily: a weights store tensor, a checkpoint tensor, or an adapter's matrix.

    Checkpoints (``.safetensors``, sharded folders, ``.pt``/``.bin``, ``.gguf``, ``.npy``) are
    read through :func:`prismoe_store.sources.checkpoint.open_source`, so ``tensor`` may be an alias
    (``lm_head``, ``embedding``). Without ``tensor``, a store or checkpoint holding a single
    matrix needs no name; else ``fallback`` is tried (e.g. the other side's tensor name). An adapter
    store stands for the matrix it computes at ρ = 1 (:class:`~prismoe_store.runtime.dense.DenseView`:
    a fitted adapter's ``Σ_p α_p s_p W_p``, a head adapter's rows in token order): it holds one
    matrix, so ``tensor`` does not apply to it (its name is ``""``), and an unfinished one raises
    :class:`~prismoe_store.errors.IncompleteStoreError`; ``int8`` reads its INT8 tiles, dequantized.

    >>> from prismoe_store.grid import plan_grid
    >>> ws = WeightsStore.create("memory://doc-open", overwrite=True)
    >>> ws.write_matrix("w", np.ones((8, 4), np.float32), plan_grid(4, 8, 4))
    >>> m = open_matrix("memory://doc-open")
    >>> m.shape, m.name, m.grid.workers
    ((8, 4), 'w', 4)
    """
    path = str(path)
    kind = existing_kind(path, storage_options=storage_options) if is_store(path) else None
    if kind == "pairs":  # activation pairs or hidden states: rows of data, not a matrix
        raise StoreFormatError(f"store at {path} is a pairs store: compare reads matrices (a weights store, an "
                               "adapter store, a model file or a .npy)")
    if kind == "adapter":
        from prismoe_store.runtime.dense import DenseView  # imports torch: only when an adapter is compared
        from prismoe_store.runtime.quant import int8_ready

        adapter = AdapterStore.open(path, storage_options=storage_options, require_complete=True)
        if int8 and not int8_ready(adapter):
            raise IncompleteStoreError(f"{path} has no finished INT8 tiles: run `prismoe quantize` first")
        what = "head" if adapter.layout == "partition" else "fitted"
        tiles = "INT8 tiles" if int8 else "float32 tiles"
        return OpenedArray(DenseView(adapter, int8=int8), "", f"{path} ({what} adapter's matrix at ρ = 1, {tiles})")
    if is_store(path):
        store = WeightsStore.open(path, storage_options=storage_options)
        name = pick_name(store.tensors(), tensor, path, fallback)
        return OpenedArray(store.array(name), name, f"{path}:{name}", store.grid(name))
    from prismoe_store.sources.checkpoint import open_source  # the checkpoint readers

    src = open_source(path)
    if tensor is None:
        matrices = sorted(n for n, info in src.tensors().items() if info.is_matrix)
        tensor = matrices[0] if len(matrices) == 1 else fallback  # an alias resolves in src.matrix
        if tensor is None:
            raise TensorNotFoundError(
                f"{path} holds {len(matrices)} matrices ({', '.join(matrices) or 'none'}): name one with --tensor")
    info = src.matrix(tensor)
    rows, cols = info.shape  # matrix() refuses anything but 2-D
    found = src.resolution(tensor)
    note = f"{found.asked} is tied to {info.name}: {found.why}" if found.rule == "tied" else None
    return OpenedArray(_SourceMatrix(src, info.name, (rows, cols)), info.name, f"{path}:{info.name}", note=note)


class _SourceMatrix:
    """A 2-D tensor of an extract ``Source``, sliced like a NumPy array (``m[r0:r1, c0:c1]``)."""

    def __init__(self, source, name: str, shape: tuple[int, int]):
        self.source = source  # the opened checkpoint
        self.name = name  # the tensor's name in it
        self.shape = tuple(shape)  # (rows, cols)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        return self.source.read(self.name, rows, cols)


def open_tensor(path, *, tensor: str | None = None) -> OpenedArray:
    """Open a 2-D or 3-D array lazily for visualization: ``.npy``, ``.pt``/``.bin`` or a weights store.

    A weights store tensor is viewed as its stack of tiles ``(workers, tile_out, tile_in)``.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.npy"); np.save(p, np.zeros((2, 3, 4), np.float32))
    >>> open_tensor(p).shape
    (2, 3, 4)
    """
    path = str(path)
    if is_store(path):
        store = WeightsStore.open(path)
        name = pick_name(store.tensors(), tensor, path)
        return OpenedArray(TileStack(store, name), name, f"{path}:{name} (tiles)", store.grid(name))
    if not os.path.exists(path):
        raise SourceError(f"no such file: {path}")
    if path.endswith(".npy"):
        opened = _open_npy(path)
    elif path.endswith((".pt", ".pth", ".bin")):
        opened = _open_torch(path, tensor)
    else:
        raise SourceError(f"{path}: visualize reads .npy, .pt/.pth/.bin files or weights stores")
    if len(opened.shape) not in (2, 3):
        raise DataError(f"{opened.label} has shape {opened.shape}: visualize needs a 2-D or 3-D tensor")
    return opened


class TileStack:
    """A weights store tensor seen as a 3-D array of its tiles ``(workers, tile_out, tile_in)``.

    Only ``stack[worker]`` and ``stack[worker, r0:r1]`` are supported; padding reads as zeros.

    >>> ws = WeightsStore.create("memory://doc-stack", overwrite=True)
    >>> grid = GridSpec(d_in=4, d_out=6, rows=2, cols=1, tile_out=4, tile_in=4)
    >>> ws.write_matrix("w", np.ones((6, 4), np.float32), grid)
    >>> s = TileStack(ws, "w")
    >>> s.shape, s.name(1), s.valid_shape(1), float(s[1].sum())
    ((2, 4, 4), 'tile 1 (r1, c0)', (2, 4), 8.0)
    """

    unit = "tile"  # what one slice along axis 0 is

    def __init__(self, store: WeightsStore, tensor: str):
        self.store = store  # the weights store
        self.tensor = tensor  # the tensor's name in it
        self.grid = store.grid(tensor)  # its tile grid
        self.dtype = np.dtype(store.array(tensor).dtype)  # stored dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(workers, tile_out, tile_in)``."""
        return (self.grid.workers, self.grid.tile_out, self.grid.tile_in)

    def name(self, worker: int) -> str:
        """A title for tile ``worker``: its index and grid position."""
        r, c = self.grid.row_col(worker)
        return f"tile {worker} (r{r}, c{c})" + (" padding" if self.grid.is_padding(worker) else "")

    def valid_shape(self, worker: int) -> tuple[int, int]:
        """Rows and columns of tile ``worker`` that hold matrix values (the rest is padding)."""
        rows, cols = self.grid.valid_region(worker)
        return rows.stop - rows.start, cols.stop - cols.start

    def __getitem__(self, key):
        worker, rows = (key if isinstance(key, tuple) else (key, slice(None)))
        return self.store.read_tile(self.tensor, int(worker))[rows]


def _open_npy(path: str) -> OpenedArray:
    arr = _NpyFile(path)
    return OpenedArray(arr, os.path.splitext(os.path.basename(path))[0], path)


class _NpyFile:
    """A ``.npy`` file sliced like a NumPy array, memory-mapped afresh for each read and unmapped
    after it, so the pages it touched do not pile up in the process's resident memory."""

    def __init__(self, path: str):
        self.path = path  # the .npy file
        arr = self._map()
        self.shape, self.dtype = tuple(arr.shape), arr.dtype  # its shape and dtype

    def _map(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SourceError(f"cannot read {self.path}: {e}") from None

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self._map()[key])  # a copy; the map goes when the view does


def _open_torch(path: str, tensor: str | None) -> OpenedArray:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for bad files
            raise SourceError(f"cannot read {path}: {e}") from None
    except Exception as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    if isinstance(obj, torch.Tensor):
        return OpenedArray(_TorchArray(obj), os.path.splitext(os.path.basename(path))[0], path)
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        name = pick_name(sorted(tensors), tensor, path)
        return OpenedArray(_TorchArray(tensors[name]), name, f"{path}:{name}")
    raise SourceError(f"{path} holds a {type(obj).__name__}, not a tensor or a state dict")


class _TorchArray:
    """A torch tensor sliced like a NumPy array (bfloat16 and other non-NumPy dtypes as float32)."""

    def __init__(self, t):
        self.t = t  # the (possibly memory-mapped) tensor
        self.shape = tuple(t.shape)  # its shape

    def __getitem__(self, key):
        import torch

        part = self.t[key]
        if part.dtype == torch.bfloat16 or "float8" in str(part.dtype):  # no NumPy dtype: widen exactly
            part = part.float()
        return part.numpy()
