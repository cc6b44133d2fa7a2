"""Look inside stores and compare matrices, streamed tile by tile (never a whole matrix in RAM).

- :func:`tile_stats` computes per-tile statistics (Frobenius norm, mean, std, absmax, share of
  zeros) of a matrix on its grid, reading a few tiles at a time.
- :func:`inspect_store` reads a store's format attribute and hands it to the inspector of that
  format (:data:`INSPECTORS`); each returns a :class:`Report` (text, JSON and heatmaps).
- :func:`compare_matrices` streams two matrices block by block: max abs diff, relative Frobenius
  error and cosine similarity. :func:`open_matrix` opens a store tensor, a ``.npy`` file or a
  checkpoint tensor as a lazily read 2-D array for it.

>>> import numpy as np
>>> from prismoe_store.grid import GridSpec
>>> w = np.arange(15, dtype=np.float32).reshape(5, 3)
>>> s = tile_stats(w, GridSpec(d_in=3, d_out=5, rows=4, cols=1, tile_out=2, tile_in=4))
>>> s.norm.round(3).tolist(), s.padding.tolist()
([7.416, 21.237, 22.561, 0.0], [False, False, False, True])
>>> compare_matrices(w, w + 1).max_abs_diff
1.0
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from .errors import DataError, SourceError, StoreFormatError, TensorNotFoundError
from .grid import GridSpec
from .stores import FORMAT_KEY, Progress, WeightsStore, open_root, reading

ProgressFn = Callable[[int, int], None]
DEFAULT_MAX_BYTES = 16 << 20  # float64 bytes per block read (tiles, bands); peak RSS is a few times this

# Store format name -> "module:function" of its inspector, imported only when used. An inspector
# is called as fn(url, *, tensor, stats, max_bytes, progress, storage_options) and returns a Report.
# A new store kind adds one line here.
INSPECTORS: dict[str, str] = {
    "weights": "prismoe_store.inspect:inspect_weights",
}


class Report(Protocol):
    """What every inspector returns: a human summary, a JSON object and heatmaps to plot."""

    def text(self) -> str: ...  # multi-line human summary

    def to_dict(self) -> dict: ...  # JSON-ready (non-finite floats as None)

    def heatmaps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]: ...  # title -> (values, padding mask)


# -- per-tile statistics ---------------------------------------------------------------------


@dataclass(frozen=True)
class TileStats:
    """Statistics of each tile's true (unpadded) values; arrays are indexed by worker.

    Padding-only workers have ``count == 0``, ``norm == 0`` and NaN for the other statistics.

    >>> from prismoe_store.grid import plan_grid
    >>> s = tile_stats(np.eye(4, dtype=np.float32), plan_grid(4, 4, 4))
    >>> s.zero_share.tolist(), s.summary()["frobenius"]
    ([0.5, 1.0, 1.0, 0.5], 2.0)
    """

    grid: GridSpec  # the grid the statistics are laid out on
    count: np.ndarray  # int64: number of true values in each tile (0 for padding-only workers)
    norm: np.ndarray  # Frobenius norm of each tile
    mean: np.ndarray  # mean value of each tile
    std: np.ndarray  # population standard deviation of each tile
    absmax: np.ndarray  # largest absolute value of each tile
    zero_share: np.ndarray  # share of exact zeros among the tile's values
    nonfinite: np.ndarray  # int64: number of NaN/Inf values in each tile

    def __post_init__(self) -> None:
        for name in ("count", "norm", "mean", "std", "absmax", "zero_share", "nonfinite"):
            if getattr(self, name).shape != (self.grid.workers,):
                raise DataError(f"TileStats.{name} must have one entry per worker ({self.grid.workers})")

    @property
    def padding(self) -> np.ndarray:
        """Boolean mask of padding-only workers."""
        return self.count == 0

    def on_grid(self, name: str) -> np.ndarray:
        """One statistic laid out as a ``(rows, cols)`` array (tile ``(r, c)`` at ``[r, c]``)."""
        return np.asarray(getattr(self, name)).reshape(self.grid.rows, self.grid.cols)

    def summary(self) -> dict:
        """Whole-matrix statistics combined from the tiles, and the spread of tile norms."""
        live = ~self.padding
        n = int(self.count.sum())
        mean = float((self.count[live] * self.mean[live]).sum() / n)
        # combine per-tile moments exactly (Chan et al.): M2 = sum(M2_i + n_i (mean_i - mean)^2)
        m2 = float((self.count[live] * (self.std[live] ** 2 + (self.mean[live] - mean) ** 2)).sum())
        norms = self.norm[live]
        order = np.argsort(norms, kind="stable")
        live_ids = np.flatnonzero(live)
        return {
            "values": n,
            "frobenius": float(math.sqrt(float((self.norm ** 2).sum()))),
            "mean": mean,
            "std": math.sqrt(m2 / n),
            "absmax": float(self.absmax[live].max()),
            "zero_share": float((self.zero_share[live] * self.count[live]).sum() / n),
            "nonfinite": int(self.nonfinite.sum()),
            "tile_norm_min": float(norms[order[0]]),
            "tile_norm_median": float(np.median(norms)),
            "tile_norm_max": float(norms[order[-1]]),
            "tile_norm_argmin": int(live_ids[order[0]]),
            "tile_norm_argmax": int(live_ids[order[-1]]),
            "padding_workers": [int(j) for j in np.flatnonzero(self.padding)],
        }

    def to_dict(self) -> dict:
        """JSON-ready: the summary plus every per-tile array (NaN as ``None``)."""
        out = {"summary": self.summary()}
        for name in ("count", "norm", "mean", "std", "absmax", "zero_share", "nonfinite"):
            out[name] = [_num(v) for v in np.asarray(getattr(self, name)).tolist()]
        return _jsonable(out)


def tile_stats(source, grid: GridSpec, *, max_bytes: int = DEFAULT_MAX_BYTES,
               progress: ProgressFn | None = None) -> TileStats:
    """Per-tile statistics of a ``(d_out, d_in)`` matrix on ``grid``, reading a few tiles at a time.

    ``source`` is anything sliced like ``source[r0:r1, c0:c1]`` (a Zarr array, a NumPy array or
    memory map); each read covers the tiles of one band that fit in ``max_bytes`` of float64
    (at least one tile). ``progress(done, total)`` counts non-padding tiles.

    >>> from prismoe_store.grid import GridSpec
    >>> s = tile_stats(np.ones((5, 3)), GridSpec(d_in=3, d_out=5, rows=2, cols=1, tile_out=4, tile_in=4))
    >>> s.count.tolist(), s.std.tolist()
    ([12, 3], [0.0, 0.0])
    """
    if tuple(source.shape) != (grid.d_out, grid.d_in):
        raise DataError(f"matrix shape {tuple(source.shape)} does not match the grid's {grid.d_out}×{grid.d_in}")
    n = grid.workers
    count, nonfinite = np.zeros(n, np.int64), np.zeros(n, np.int64)
    norm = np.zeros(n)
    mean, std, absmax, zero_share = (np.full(n, np.nan) for _ in range(4))
    a, b = grid.tile_shape
    per_read = max(1, max_bytes // (a * b * 8))
    live_rows, live_cols = -(-grid.d_out // a), -(-grid.d_in // b)
    total, done = grid.active_count, 0
    for r in range(live_rows):
        r0, r1 = r * a, min((r + 1) * a, grid.d_out)
        for c0 in range(0, live_cols, per_read):
            c1 = min(c0 + per_read, live_cols)
            with reading(f"rows {r0}:{r1}, tiles {c0}..{c1 - 1} of band {r}"):
                block = np.asarray(source[r0:r1, c0 * b:min(c1 * b, grid.d_in)])
            for c in range(c0, c1):
                j = grid.worker(r, c)
                x = block[:, (c - c0) * b:(c - c0 + 1) * b]
                count[j], norm[j], mean[j], std[j], absmax[j], zero_share[j], nonfinite[j] = _moments(x)
            done += c1 - c0
            if progress is not None:
                progress(done, total)
    return TileStats(grid=grid, count=count, norm=norm, mean=mean, std=std, absmax=absmax,
                     zero_share=zero_share, nonfinite=nonfinite)


def _moments(x: np.ndarray) -> tuple[int, float, float, float, float, float, int]:
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf values give NaN stats, counted below
        mean = float(x.sum()) / n
        d = x - mean
        return (n, math.sqrt(float(x @ x)), mean, math.sqrt(float(d @ d) / n), float(np.abs(x).max()),
                float(n - np.count_nonzero(x)) / n, int(n - np.count_nonzero(np.isfinite(x))))


# -- inspecting stores -----------------------------------------------------------------------


def inspect_store(url, *, tensor: str | None = None, stats: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: ProgressFn | None = None, storage_options: dict | None = None) -> Report:
    """Inspect any prismoe store: dispatch on its format attribute to the matching inspector.

    ``tensor`` limits the report to one item (a tensor of a weights store); ``stats=False``
    skips the streamed per-tile statistics (metadata only).

    >>> from prismoe_store.grid import plan_grid
    >>> ws = WeightsStore.create("memory://doc-inspect", overwrite=True)
    >>> ws.write_matrix("w", np.ones((8, 4), np.float32), plan_grid(4, 8, 4))
    >>> rep = inspect_store("memory://doc-inspect")
    >>> rep.tensors[0].stats.summary()["frobenius"]
    5.656854249492381
    """
    url = str(url)
    group = open_root(url, "r", storage_options=storage_options)
    tag = group.attrs.get(FORMAT_KEY)
    if not isinstance(tag, dict) or "format" not in tag:
        raise StoreFormatError(f"{url} is not a prismoe store (no {FORMAT_KEY!r} attribute)")
    target = INSPECTORS.get(tag["format"])
    if target is None:
        raise StoreFormatError(
            f"{url} is a {tag['format']!r} store; inspect knows: {', '.join(sorted(INSPECTORS))}")
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return fn(url, tensor=tensor, stats=stats, max_bytes=max_bytes, progress=progress,
              storage_options=storage_options)


@dataclass(frozen=True)
class TensorReport:
    """What :func:`inspect_weights` reports about one tensor of a weights store."""

    name: str  # tensor name in the store
    shape: tuple[int, int]  # (d_out, d_in)
    dtype: str  # stored dtype
    grid: GridSpec  # the tile grid the tensor is chunked on
    complete: bool  # True once every tile is written and the tensor is marked complete
    units_done: int  # finished units in the progress record
    units_total: int  # units in the progress record
    unit: str  # "tile", or "band" for a sharded tensor
    codecs: list[str]  # bytes-to-bytes codecs of each chunk, in order
    bytes_memory: int  # bytes of the tensor in memory (d_out * d_in * itemsize)
    bytes_disk: int  # bytes the tensor's chunks and metadata take in the store
    source: dict  # where it came from: attributes other than the store's own
    stats: TileStats | None = None  # per-tile statistics (None: incomplete or not asked)

    def to_dict(self) -> dict:
        """JSON-ready dict (statistics with per-tile arrays)."""
        return _jsonable({
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype, "grid": self.grid.to_dict(),
            "padding_fraction": self.grid.padding_fraction, "active_workers": self.grid.active_count,
            "complete": self.complete, "progress": {"unit": self.unit, "done": self.units_done,
                                                    "total": self.units_total},
            "codecs": self.codecs, "bytes_memory": self.bytes_memory, "bytes_disk": self.bytes_disk,
            "source": self.source, "stats": None if self.stats is None else self.stats.to_dict(),
        })

    def text(self) -> str:
        """A few indented lines for humans."""
        g = self.grid
        state = "complete" if self.complete else (
            f"INCOMPLETE: {self.units_done}/{self.units_total} {self.unit}s written, re-run the job to finish")
        src = "; ".join(f"{k if k == 'source' else k.removeprefix('source_')} {v}" for k, v in self.source.items())
        lines = [
            f"tensor {self.name!r} [{state}]",
            f"  shape {self.shape[0]} × {self.shape[1]} (d_out × d_in), dtype {self.dtype}",
            f"  grid {g}; padding {100 * g.padding_fraction:.2f}%, {g.active_count}/{g.workers} workers active",
            f"  bytes {_human(self.bytes_memory)} in memory, {_human(self.bytes_disk)} on disk "
            f"(×{self.bytes_disk / max(1, self.bytes_memory):.3f}); codecs {' + '.join(self.codecs)}",
        ]
        if src:
            lines.append(f"  from {src}")
        if self.stats is not None:
            s = self.stats.summary()
            pad = s["padding_workers"]
            lines += [
                f"  values: frobenius {s['frobenius']:.6g}, mean {s['mean']:.4g}, std {s['std']:.4g}, "
                f"absmax {s['absmax']:.4g}, zeros {100 * s['zero_share']:.3f}%, non-finite {s['nonfinite']}",
                f"  tile norms: min {s['tile_norm_min']:.4g} (worker {s['tile_norm_argmin']}), "
                f"median {s['tile_norm_median']:.4g}, max {s['tile_norm_max']:.4g} (worker {s['tile_norm_argmax']})",
                f"  padding-only workers: {len(pad)} of {g.workers}" + (f" ({_ranges(pad)})" if pad else ""),
            ]
        return "\n".join(lines)


@dataclass(frozen=True)
class WeightsReport:
    """The report on a weights store: its format, options and one :class:`TensorReport` per tensor."""

    url: str  # where the store is
    format: str  # "weights"
    version: int  # format version
    options: dict  # the store's default encoding options
    tensors: list[TensorReport] = field(default_factory=list)  # the tensors inspected

    def to_dict(self) -> dict:
        """One JSON object for ``--json``."""
        return {"url": self.url, "format": self.format, "version": self.version, "options": self.options,
                "tensors": [t.to_dict() for t in self.tensors]}

    def text(self) -> str:
        """The human summary of the store."""
        opts = ", ".join(f"{k} {v}" for k, v in self.options.items())
        head = [f"{self.url}: {self.format} store, format version {self.version} ({opts})",
                f"{len(self.tensors)} tensor(s)"]
        return "\n".join(head + [t.text() for t in self.tensors])

    def heatmaps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Tile-norm heatmap of each tensor that has statistics."""
        return {f"{t.name} tile norms": (t.stats.on_grid("norm"), t.stats.on_grid("padding"))
                for t in self.tensors if t.stats is not None}


def inspect_weights(url, *, tensor: str | None = None, stats: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                    progress: ProgressFn | None = None, storage_options: dict | None = None) -> WeightsReport:
    """Inspect a weights store: every tensor (or ``tensor``), with streamed per-tile stats.

    >>> from prismoe_store.grid import GridSpec
    >>> ws = WeightsStore.create("memory://doc-inspect-w", overwrite=True)
    >>> grid = GridSpec(d_in=4, d_out=5, rows=2, cols=2, tile_out=4, tile_in=2)
    >>> ws.write_matrix("w", np.ones((5, 4), np.float32), grid)
    >>> t = inspect_weights("memory://doc-inspect-w").tensors[0]
    >>> t.shape, t.complete, t.stats.count.tolist(), (t.stats.norm ** 2).round(9).tolist()
    ((5, 4), True, [8, 8, 2, 2], [8.0, 8.0, 2.0, 2.0])
    """
    store = WeightsStore.open(url, storage_options=storage_options)
    arrays = {arr.attrs["tensor"]: arr for _, arr in sorted(store.group["tensors"].arrays())} \
        if "tensors" in store.group else {}
    if tensor is not None:
        if tensor not in arrays:
            raise TensorNotFoundError(f"tensor {tensor!r} is not in {url} (it has: {', '.join(arrays) or 'none'})")
        arrays = {tensor: arrays[tensor]}
    reports = []
    own = {"tensor", "grid", "dtype", "complete"}
    for name, arr in arrays.items():
        attrs = dict(arr.attrs)
        grid = GridSpec.from_dict(attrs["grid"])
        # the progress record's name follows WeightsStore.begin: the array path with "/" -> "."
        record = Progress.open(store.group, arr.path.replace("/", "."))
        done = len(record.done()) if record is not None else 0
        complete = bool(attrs.get("complete"))
        reports.append(TensorReport(
            name=name, shape=tuple(arr.shape), dtype=str(arr.dtype), grid=grid, complete=complete,
            units_done=done, units_total=record.units if record is not None else grid.workers,
            unit="band" if arr.shards is not None else "tile",
            codecs=[_codec_name(c) for c in arr.compressors], bytes_memory=int(arr.nbytes),
            bytes_disk=int(arr.nbytes_stored()), source={k: v for k, v in attrs.items() if k not in own},
            stats=tile_stats(arr, grid, max_bytes=max_bytes, progress=progress) if stats and complete else None,
        ))
    return WeightsReport(url=str(url), format="weights", version=int(store.group.attrs[FORMAT_KEY]["version"]),
                         options=dict(store.group.attrs.get("options", {})), tensors=reports)


def _codec_name(codec) -> str:
    name = type(codec).__name__.removesuffix("Codec").lower()
    level = getattr(codec, "level", None) or getattr(codec, "clevel", None)
    return f"{name}({level})" if level else name


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
        return _jsonable({"shape": list(self.shape), "max_abs_diff": self.max_abs_diff, "argmax": list(self.argmax),
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
    step_r, step_c = _block_shape(sa, _chunks(a) or _chunks(b), max_bytes)
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


def _chunks(m) -> tuple[int, int] | None:
    chunks = getattr(m, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 2 and all(isinstance(c, int) for c in chunks):
        return chunks
    return None


def _block_shape(shape: tuple[int, int], chunks: tuple[int, int] | None, max_bytes: int) -> tuple[int, int]:
    """Rows and cols of a block: whole chunk multiples, within ``max_bytes`` of float64 where possible."""
    rows, cols = shape
    unit_r, unit_c = chunks if chunks else (1, cols)
    unit_r, unit_c = max(1, min(unit_r, rows)), max(1, min(unit_c, cols))
    budget = max(1, max_bytes // 8)
    if unit_r * cols <= budget:  # whole bands of chunk rows
        return unit_r * max(1, budget // (unit_r * cols)), cols
    return unit_r, min(cols, unit_c * max(1, budget // (unit_r * unit_c)))


# -- opening matrices and tensors ------------------------------------------------------------


@dataclass(frozen=True)
class OpenedArray:
    """A lazily read array and what it is: :func:`open_matrix` / :func:`open_tensor` return one."""

    array: Any  # sliced like a NumPy array: a Zarr array, a memory map, or a lazy reader
    name: str  # the tensor's name where it came from
    label: str  # "path:tensor", for messages
    grid: GridSpec | None = None  # the store's grid when it came from a weights store

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
                storage_options: dict | None = None) -> OpenedArray:
    """Open a 2-D matrix lazily: a weights store tensor or a checkpoint tensor.

    Checkpoints (``.safetensors``, sharded folders, ``.pt``/``.bin``, ``.gguf``, ``.npy``) are
    read through :func:`prismoe_store.extract.open_source`, so ``tensor`` may be an alias
    (``lm_head``, ``embedding``). Without ``tensor``, a store or checkpoint holding a single
    matrix needs no name; else ``fallback`` is tried (e.g. the other side's tensor name).

    >>> from prismoe_store.grid import plan_grid
    >>> ws = WeightsStore.create("memory://doc-open", overwrite=True)
    >>> ws.write_matrix("w", np.ones((8, 4), np.float32), plan_grid(4, 8, 4))
    >>> m = open_matrix("memory://doc-open")
    >>> m.shape, m.name, m.grid.workers
    ((8, 4), 'w', 4)
    """
    path = str(path)
    if is_store(path):
        store = WeightsStore.open(path, storage_options=storage_options)
        name = _only(store.tensors(), tensor, path, fallback)
        return OpenedArray(store.array(name), name, f"{path}:{name}", store.grid(name))
    from .extract import open_source  # the checkpoint readers

    src = open_source(path)
    if tensor is None:
        matrices = sorted(n for n, info in src.tensors().items() if info.is_matrix)
        tensor = matrices[0] if len(matrices) == 1 else fallback  # an alias resolves in src.matrix
        if tensor is None:
            raise TensorNotFoundError(
                f"{path} holds {len(matrices)} matrices ({', '.join(matrices) or 'none'}): name one with --tensor")
    info = src.matrix(tensor)
    return OpenedArray(_SourceMatrix(src, info.name, info.shape), info.name, f"{path}:{info.name}")


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
        name = _only(store.tensors(), tensor, path)
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
    """

    unit = "tile"  # what one slice along axis 0 is

    def name(self, worker: int) -> str:
        """A title for tile ``worker``: its index and grid position."""
        r, c = self.grid.row_col(worker)
        return f"tile {worker} (r{r}, c{c})" + (" padding" if self.grid.is_padding(worker) else "")

    def valid_shape(self, worker: int) -> tuple[int, int]:
        """Rows and columns of tile ``worker`` that hold matrix values (the rest is padding)."""
        rows, cols = self.grid.valid_region(worker)
        return rows.stop - rows.start, cols.stop - cols.start

    def __init__(self, store: WeightsStore, tensor: str):
        self.store = store  # the weights store
        self.tensor = tensor  # the tensor's name in it
        self.grid = store.grid(tensor)  # its tile grid
        self.dtype = np.dtype(store.array(tensor).dtype)  # stored dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(workers, tile_out, tile_in)``."""
        return (self.grid.workers, self.grid.tile_out, self.grid.tile_in)

    def __getitem__(self, key):
        worker, rows = (key if isinstance(key, tuple) else (key, slice(None)))
        return self.store.read_tile(self.tensor, int(worker))[rows]


def _only(names: list[str], wanted: str | None, where: str, fallback: str | None = None) -> str:
    if wanted is not None:
        if wanted not in names:
            raise TensorNotFoundError(f"tensor {wanted!r} is not in {where} (it has: {', '.join(names) or 'none'})")
        return wanted
    if fallback is not None and len(names) != 1:
        return _only(names, fallback, where)
    if len(names) != 1:
        raise TensorNotFoundError(
            f"{where} holds {len(names)} tensors ({', '.join(names) or 'none'}): name one with --tensor")
    return names[0]


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
        name = _only(sorted(tensors), tensor, path)
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


# -- small helpers ---------------------------------------------------------------------------


def _num(v):
    return v if isinstance(v, (int, bool)) or (isinstance(v, float) and math.isfinite(v)) else None


def _jsonable(obj):
    """Recursively replace non-finite floats with None and NumPy scalars with Python ones."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _ranges(ids: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (at most 8 ranges shown)."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in spans[:8]]
    return ", ".join(text) + (", …" if len(spans) > 8 else "")
