"""Look inside stores and compare matrices, streamed tile by tile (never a whole matrix in RAM).

- :func:`tile_stats` computes per-tile statistics (Frobenius norm, mean, std, absmax, share of
  zeros) of a matrix on its grid, reading a few tiles at a time.
- :func:`column_stats` computes per-column statistics (mean, std, absmax, non-finite count) of
  an array's rows, reading chunk-aligned row blocks (a pairs store's ``x`` and ``z``).
- :func:`inspect_store` reads a store's format attribute and hands it to the inspector of that
  format (:data:`INSPECTORS`: :func:`inspect_weights`, :func:`inspect_pairs`,
  :func:`inspect_adapter`); each returns a :class:`Report` (text, JSON and PNG plots).
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
from .stores import FORMAT_KEY, Progress, WeightsStore, check_stored, open_root, reading

ProgressFn = Callable[[int, int], None]
DEFAULT_MAX_BYTES = 16 << 20  # float64 bytes per block read (tiles, bands); peak RSS is a few times this

# Store format name -> "module:function" of its inspector, imported only when used. An inspector
# is called as fn(url, *, tensor, stats, max_bytes, progress, storage_options) and returns a Report.
# A new store kind adds one line here.
INSPECTORS: dict[str, str] = {
    "weights": "prismoe_store.inspect:inspect_weights",
    "pairs": "prismoe_store.inspect:inspect_pairs",
    "adapter": "prismoe_store.inspect:inspect_adapter",
}


class Report(Protocol):
    """What every inspector returns: a human summary, a JSON object and PNG plots."""

    def text(self) -> str: ...  # multi-line human summary

    def to_dict(self) -> dict: ...  # JSON-ready (non-finite floats as None)

    def plot(self, out_dir) -> list: ...  # write the report's PNGs into out_dir, return their paths


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
        return jsonable(out)


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


def store_format(url, *, storage_options: dict | None = None) -> str:
    """The format name (``"weights"``, ``"pairs"``, ``"adapter"``, ...) of the prismoe store at ``url``.

    >>> store_format("memory://doc-inspect")
    'weights'
    """
    url = str(url)
    group = open_root(url, "r", storage_options=storage_options)
    tag = group.attrs.get(FORMAT_KEY)
    if not isinstance(tag, dict) or "format" not in tag:
        raise StoreFormatError(f"{url} is not a prismoe store (no {FORMAT_KEY!r} attribute)")
    return str(tag["format"])


def inspect_store(url, *, tensor: str | None = None, stats: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: ProgressFn | None = None, storage_options: dict | None = None) -> Report:
    """Inspect any prismoe store: dispatch on its format attribute to the matching inspector.

    ``tensor`` limits the report to one item (a tensor of a weights store, ``x`` or ``z`` of a
    pairs store, ``pipe1``.. of an adapter); ``stats=False`` skips the streamed statistics
    (metadata only). ``progress(done, total)`` counts the blocks or tiles read.

    >>> from prismoe_store.grid import plan_grid
    >>> ws = WeightsStore.create("memory://doc-inspect", overwrite=True)
    >>> ws.write_matrix("w", np.ones((8, 4), np.float32), plan_grid(4, 8, 4))
    >>> rep = inspect_store("memory://doc-inspect")
    >>> rep.tensors[0].stats.summary()["frobenius"]
    5.656854249492381
    """
    url = str(url)
    fmt = store_format(url, storage_options=storage_options)
    target = INSPECTORS.get(fmt)
    if target is None:
        raise StoreFormatError(f"{url} is a {fmt!r} store; inspect knows: {', '.join(sorted(INSPECTORS))}")
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
        return jsonable({
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

    def plot(self, out_dir) -> list:
        """Write the tile-norm heatmaps as PNGs into ``out_dir``; return their paths."""
        from .plots import report_heatmaps

        return report_heatmaps(self, out_dir)


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
            stats=tile_stats(_Checked(arr, arr.shape, f"{name!r} in {url}"), grid, max_bytes=max_bytes,
                             progress=progress) if stats and complete else None,
        ))
    return WeightsReport(url=str(url), format="weights", version=int(store.group.attrs[FORMAT_KEY]["version"]),
                         options=dict(store.group.attrs.get("options", {})), tensors=reports)


def _codec_name(codec) -> str:
    name = type(codec).__name__.removesuffix("Codec").lower()
    level = getattr(codec, "level", None) or getattr(codec, "clevel", None)
    return f"{name}({level})" if level else name


class _Checked:
    """The region ``[:shape[0], :shape[1]]`` of a 2-D Zarr array, sliced like NumPy; each read first
    checks that the chunks under it exist (Zarr reads a missing chunk as zeros, and the writers here
    write every chunk, so a missing one is damage) and turns decoding failures into
    :class:`~prismoe_store.errors.CorruptStoreError`."""

    def __init__(self, array, shape: tuple[int, int], what: str):
        self.array = array  # the Zarr array
        self.shape = tuple(int(n) for n in shape)  # the region read: (rows, cols) from the origin
        self.chunks = tuple(array.chunks)  # the array's chunk shape (reads align to it)
        self.what = what  # what the array is, for error messages

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = (slice(*k.indices(n)) for k, n in zip(key, self.shape))
        if rows.stop > rows.start and cols.stop > cols.start:
            check_stored(self.array, rows, cols, self.what)
        with reading(f"rows {rows.start}:{rows.stop}, columns {cols.start}:{cols.stop} of {self.what}"):
            return self.array[rows, cols]


# -- per-column statistics (pairs stores) ----------------------------------------------------


@dataclass(frozen=True)
class ColumnStats:
    """Per-column statistics of an array's rows over each column's *finite* values, and the root
    mean square of blocks (row range × column range) for a heatmap of how values vary along the rows.

    A column without finite values has ``count == 0`` and NaN for ``mean``, ``std`` and ``absmax``.

    >>> s = column_stats(np.array([[1.0, np.nan], [3.0, 2.0]]))
    >>> s.mean.tolist(), s.std.tolist(), s.nonfinite.tolist(), s.summary()["nonfinite_share"]
    ([2.0, 2.0], [1.0, 0.0], [0, 1], 0.25)
    """

    rows: int  # rows the statistics cover
    count: np.ndarray  # int64 [cols]: finite values of each column
    mean: np.ndarray  # mean of each column's finite values
    std: np.ndarray  # population standard deviation of each column's finite values
    absmax: np.ndarray  # largest |value| among each column's finite values
    nonfinite: np.ndarray  # int64 [cols]: NaN/Inf values of each column
    block_rms: np.ndarray  # [row bins, col bins]: RMS of each block's finite values (NaN when none)
    row_edges: np.ndarray  # int64 [row bins + 1]: row bin i covers rows row_edges[i]:row_edges[i + 1]
    col_edges: np.ndarray  # int64 [col bins + 1]: column bin k covers columns col_edges[k]:col_edges[k + 1]

    def __post_init__(self) -> None:
        cols = self.count.shape[0]
        for name in ("mean", "std", "absmax", "nonfinite"):
            if getattr(self, name).shape != (cols,):
                raise DataError(f"ColumnStats.{name} must have one entry per column ({cols})")
        if self.block_rms.shape != (len(self.row_edges) - 1, len(self.col_edges) - 1):
            raise DataError("ColumnStats.block_rms must be [row bins, col bins] as the edges say")

    @property
    def columns(self) -> int:
        """Number of columns."""
        return int(self.count.shape[0])

    @property
    def nonfinite_share(self) -> np.ndarray:
        """Share of each column's values that are NaN/Inf."""
        return self.nonfinite / max(1, self.rows)

    def summary(self, top: int = 5) -> dict:
        """Whole-array statistics combined from the columns, and the spread of the column stds."""
        live = self.count > 0
        n, cells = int(self.count.sum()), self.rows * self.columns
        out = {"values": n, "nonfinite": int(self.nonfinite.sum()),
               "nonfinite_share": float(self.nonfinite.sum() / cells) if cells else 0.0,
               "nonfinite_columns": int((self.nonfinite > 0).sum()),
               "constant_columns": int((live & (self.std == 0)).sum())}
        if n == 0:
            return {**out, "mean": None, "std": None, "absmax": None, "col_std_min": None, "col_std_median": None,
                    "col_std_max": None, "col_std_argmin": None, "col_std_argmax": None, "largest_std_columns": []}
        c, m, sd = self.count[live], self.mean[live], self.std[live]
        mean = float((c * m).sum() / n)
        # combine per-column moments exactly (Chan et al.): M2 = sum(M2_i + n_i (mean_i - mean)^2)
        m2 = float((c * (sd ** 2 + (m - mean) ** 2)).sum())
        ids = np.flatnonzero(live)
        order = np.argsort(sd, kind="stable")
        return {**out, "mean": mean, "std": math.sqrt(m2 / n), "absmax": float(self.absmax[live].max()),
                "col_std_min": float(sd[order[0]]), "col_std_median": float(np.median(sd)),
                "col_std_max": float(sd[order[-1]]), "col_std_argmin": int(ids[order[0]]),
                "col_std_argmax": int(ids[order[-1]]),
                "largest_std_columns": [[int(ids[i]), float(sd[i])] for i in order[::-1][:top]]}

    def to_dict(self) -> dict:
        """JSON-ready: the summary, every per-column array and the block heatmap (NaN as ``None``)."""
        out = {"summary": self.summary(), "rows": self.rows}
        for name in ("count", "mean", "std", "absmax", "nonfinite"):
            out[name] = np.asarray(getattr(self, name)).tolist()
        out["block_rms"] = self.block_rms.tolist()
        out["row_edges"], out["col_edges"] = self.row_edges.tolist(), self.col_edges.tolist()
        return jsonable(out)


def _column_blocks(shape: tuple[int, int], chunks: tuple[int, int] | None, max_bytes: int,
                   row_bins: int) -> tuple[int, int, int]:
    """``(block rows, block cols, blocks)`` of :func:`column_stats`: whole chunks, within
    ``max_bytes`` of float64 where possible, and at least ``min(row_bins, row chunks)`` row blocks."""
    rows, cols = shape
    if rows == 0 or cols == 0:
        return 1, max(1, cols), 0
    step_r, step_c = _block_shape(shape, chunks, max_bytes)
    unit = max(1, chunks[0]) if chunks else 1
    per_bin = -(-rows // max(1, row_bins))
    step_r = max(1, min(step_r, -(-per_bin // unit) * unit))
    return step_r, step_c, -(-rows // step_r) * -(-cols // step_c)


def column_stats(array, rows: int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES, row_bins: int = 64,
                 col_bins: int = 64, progress: ProgressFn | None = None) -> ColumnStats:
    """Per-column statistics of the first ``rows`` rows (default: all) of a 2-D array, streamed.

    ``array`` is anything sliced like ``a[r0:r1, c0:c1]`` (a Zarr array, a NumPy array or memory
    map). Blocks follow its chunk grid (whole chunks, at most ``max_bytes`` of float64 where one
    chunk row allows), so memory does not grow with the rows; each block's moments are merged
    exactly in float64 (Chan et al.). NaN/Inf values are counted and left out of the moments.
    ``row_bins`` × ``col_bins`` bounds the block-RMS heatmap. ``progress(done, total)`` counts blocks.

    >>> s = column_stats(np.arange(12.0).reshape(4, 3), max_bytes=8)
    >>> s.mean.tolist(), s.count.tolist(), s.block_rms.shape
    ([4.5, 5.5, 6.5], [4, 4, 4], (4, 3))
    """
    shape = tuple(array.shape)
    if len(shape) != 2:
        raise DataError(f"column statistics need a 2-D array, got shape {shape}")
    rows = shape[0] if rows is None else max(0, min(int(rows), shape[0]))
    cols = shape[1]
    step_r, step_c, total = _column_blocks((rows, cols), _chunks(array), max_bytes, row_bins)
    n_rb = -(-rows // step_r)  # row blocks
    n_rbins, n_cbins = min(max(1, row_bins), n_rb), min(max(1, col_bins), cols)
    col_bin = np.arange(cols) * n_cbins // max(1, cols)
    col_edges = np.searchsorted(col_bin, np.arange(n_cbins + 1))
    first_block = np.searchsorted(np.arange(n_rb) * n_rbins // max(1, n_rb), np.arange(n_rbins + 1))
    row_edges = np.minimum(first_block * step_r, rows)

    count, nonfinite = np.zeros(cols, np.int64), np.zeros(cols, np.int64)
    mean, m2, absmax = np.zeros(cols), np.zeros(cols), np.zeros(cols)
    sq, sqn = np.zeros((n_rbins, n_cbins)), np.zeros((n_rbins, n_cbins))
    done = 0
    for r0 in range(0, rows, step_r):
        r1, rbin = min(r0 + step_r, rows), (r0 // step_r) * n_rbins // n_rb
        for c0 in range(0, cols, step_c):
            c = slice(c0, min(c0 + step_c, cols))
            with reading(f"rows {r0}:{r1}, columns {c.start}:{c.stop}"):
                x = np.array(array[r0:r1, c], dtype=np.float64)  # a private copy: worked on in place
            fin = np.isfinite(x)
            nb = fin.sum(0)
            clean = bool(nb.sum() == x.size)
            if not clean:
                x[~fin] = 0.0
            ss = np.einsum("ij,ij->j", x, x)
            absmax[c] = np.maximum(absmax[c], np.maximum(x.max(0), -x.min(0)))
            mb = x.sum(0) / np.maximum(nb, 1)
            x -= mb
            if not clean:
                x[~fin] = 0.0
            tot = count[c] + nb
            w = np.divide(nb, tot, out=np.zeros(len(nb)), where=tot > 0)  # the block's share of the values
            delta = mb - mean[c]
            m2[c] += np.einsum("ij,ij->j", x, x) + delta * delta * count[c] * w
            mean[c] += delta * w
            count[c], nonfinite[c] = tot, nonfinite[c] + (r1 - r0) - nb
            np.add.at(sq[rbin], col_bin[c], ss)
            np.add.at(sqn[rbin], col_bin[c], nb)
            done += 1
            if progress is not None:
                progress(done, total)
    live = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return ColumnStats(rows=rows, count=count, mean=np.where(live, mean, np.nan),
                           std=np.where(live, np.sqrt(m2 / np.maximum(count, 1)), np.nan),
                           absmax=np.where(live, absmax, np.nan), nonfinite=nonfinite,
                           block_rms=np.where(sqn > 0, np.sqrt(sq / np.maximum(sqn, 1)), np.nan),
                           row_edges=row_edges.astype(np.int64), col_edges=col_edges.astype(np.int64))


# -- pairs stores ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PairsReport:
    """What :func:`inspect_pairs` reports about a pairs store."""

    url: str  # where the store is
    version: int  # format version
    rows: int  # committed rows (what readers see)
    capacity: int  # rows the arrays hold (more than ``rows`` while an append is under way or was cut off)
    d_in: int  # width of x
    d_out: int  # width of z
    rows_per_chunk: int  # rows per chunk of x and z
    chunks: dict  # "x" / "z" -> chunk shape
    codecs: dict  # "x" / "z" -> bytes-to-bytes codecs of each chunk, in order
    bytes_memory: int  # bytes of the committed rows of x and z as float32
    bytes_disk: int  # bytes the x and z arrays (all rows written) take in the store
    provenance: dict  # where the pairs came from
    truth: dict | None = None  # the ground truth's summary when the pairs are synthetic
    stats: dict = field(default_factory=dict)  # "x" / "z" -> ColumnStats (empty: not asked)

    def to_dict(self) -> dict:
        """One JSON object for ``--json`` (statistics with per-column arrays)."""
        return jsonable({
            "url": self.url, "format": "pairs", "version": self.version, "rows": self.rows,
            "capacity": self.capacity, "d_in": self.d_in, "d_out": self.d_out,
            "rows_per_chunk": self.rows_per_chunk, "chunks": self.chunks, "codecs": self.codecs,
            "bytes_memory": self.bytes_memory, "bytes_disk": self.bytes_disk, "provenance": self.provenance,
            "truth": self.truth, "stats": {k: v.to_dict() for k, v in self.stats.items()},
        })

    def text(self) -> str:
        """The human summary of the store."""
        codecs = {" + ".join(v) for v in self.codecs.values()}
        lines = [
            f"{self.url}: pairs store, format version {self.version}",
            f"  {self.rows} rows committed" + (f" (arrays hold {self.capacity}: an append is under way or was "
                                               "cut off)" if self.capacity != self.rows else ""),
            f"  x [{self.rows}, {self.d_in}], z [{self.rows}, {self.d_out}] float32 (d_in {self.d_in} → d_out "
            f"{self.d_out})",
            f"  chunks x {tuple(self.chunks['x'])}, z {tuple(self.chunks['z'])}; rows_per_chunk "
            f"{self.rows_per_chunk}; codecs {' | '.join(sorted(codecs))}",
            f"  bytes {_human(self.bytes_memory)} in memory, {_human(self.bytes_disk)} on disk "
            f"(×{self.bytes_disk / max(1, self.bytes_memory):.3f})",
        ]
        if self.provenance:
            lines += ["  provenance:"] + _pretty(self.provenance, "    ")
        if self.truth:
            t = self.truth
            lines.append(f"  ground truth: {t['kind']}, w {t['w']}, {t['regions']} region(s)"
                         + ("" if t.get("complete") else " (INCOMPLETE)"))
        for name, s in self.stats.items():
            lines += _column_lines(name, s)
        return "\n".join(lines)

    def plot(self, out_dir) -> list:
        """Write the per-column profile and the block-RMS heatmaps as PNGs; return their paths."""
        from .plots import pairs_plots

        return pairs_plots(self, out_dir) if self.stats else []


def _column_lines(name: str, s: ColumnStats) -> list[str]:
    m = s.summary()
    if not m["values"]:
        return [f"  {name}: no finite values" + (f" ({m['nonfinite']} non-finite)" if m["nonfinite"] else "")]
    top = ", ".join(f"{c} ({v:.4g})" for c, v in m["largest_std_columns"])
    return [
        f"  {name}: mean {m['mean']:.4g}, std {m['std']:.4g}, absmax {m['absmax']:.4g}, non-finite "
        f"{m['nonfinite']} ({100 * m['nonfinite_share']:.3g}%, in {m['nonfinite_columns']} column(s))",
        f"     column std: min {m['col_std_min']:.4g} (column {m['col_std_argmin']}), median "
        f"{m['col_std_median']:.4g}, max {m['col_std_max']:.4g} (column {m['col_std_argmax']}); "
        f"{m['constant_columns']} constant column(s)",
        f"     largest std: {top}",
    ]


def inspect_pairs(url, *, tensor: str | None = None, stats: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: ProgressFn | None = None, storage_options: dict | None = None) -> PairsReport:
    """Inspect a pairs store: shape, chunking, bytes, provenance, and per-column statistics of ``x``
    and ``z`` (or only ``tensor``, ``"x"`` or ``"z"``) streamed over the committed rows.

    >>> from prismoe_store.pairs import PairsStore
    >>> p = PairsStore.create("memory://doc-inspect-p", d_in=3, d_out=2, rows_per_chunk=2, overwrite=True)
    >>> _ = p.append(np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((4, 2), np.float32))
    >>> r = inspect_pairs("memory://doc-inspect-p")
    >>> r.rows, r.stats["x"].mean.tolist(), r.stats["z"].std.tolist()
    (4, [4.5, 5.5, 6.5], [0.0, 0.0])
    """
    from .pairs import PairsStore
    from .synth import truth_summary

    store = PairsStore.open(url, storage_options=storage_options)
    rows = store.rows  # read once: a concurrent append may commit more while we read
    arrays = {"x": store.x, "z": store.z}
    names = [_only(list(arrays), tensor, str(url))] if tensor is not None else list(arrays)
    plans = {n: _column_blocks((rows, arrays[n].shape[1]), arrays[n].chunks, max_bytes, 64) for n in names}
    total, offset = sum(p[2] for p in plans.values()), 0
    col_stats = {}
    if stats:
        for n in names:
            tick = None if progress is None else (lambda d, _t, o=offset: progress(o + d, total))
            col_stats[n] = column_stats(_Checked(arrays[n], (rows, arrays[n].shape[1]), f"{n} of {url}"),
                                        max_bytes=max_bytes, progress=tick)
            offset += plans[n][2]
    return PairsReport(
        url=str(url), version=int(store.group.attrs[FORMAT_KEY]["version"]), rows=rows,
        capacity=int(store.x.shape[0]), d_in=store.d_in, d_out=store.d_out, rows_per_chunk=store.rows_per_chunk,
        chunks={n: list(a.chunks) for n, a in arrays.items()},
        codecs={n: [_codec_name(c) for c in a.compressors] for n, a in arrays.items()},
        bytes_memory=rows * (store.d_in + store.d_out) * 4,
        bytes_disk=sum(int(a.nbytes_stored()) for a in arrays.values()),
        provenance=store.provenance, truth=truth_summary(store), stats=col_stats)


# -- adapter stores --------------------------------------------------------------------------


@dataclass(frozen=True)
class PipeReport:
    """What :func:`inspect_adapter` reports about one pipe."""

    pipe: int  # 0-based pipe index (stored as pipe{pipe + 1})
    grid: GridSpec  # the pipe's grid
    fitted_rows: int | None  # training rows the pipe was fitted on (None before the fit finished)
    codecs: list[str]  # bytes-to-bytes codecs of each tile chunk, in order
    bytes_memory: int  # bytes of the padded float32 tile array
    bytes_disk: int  # bytes the float32 tiles take in the store
    int8_bytes_memory: int | None  # bytes of the INT8 tiles plus their float32 scales (None: not quantized)
    int8_bytes_disk: int | None  # bytes they take in the store
    gate: dict | None  # None without a gate; else its shape, and with statistics its norm and bias range
    stats: TileStats | None = None  # per-tile statistics (None: adapter incomplete or not asked)

    @property
    def tile_bytes_int8(self) -> int:
        """Bytes of one INT8 tile with its per-row float32 scales."""
        return self.grid.tile_out * self.grid.tile_in + 4 * self.grid.tile_out

    def to_dict(self) -> dict:
        """JSON-ready dict (statistics with per-tile arrays)."""
        g = self.grid
        return jsonable({
            "pipe": self.pipe, "name": f"pipe{self.pipe + 1}", "grid": g.to_dict(), "tile_shape": list(g.tile_shape),
            "workers": g.workers, "active_workers": g.active_count, "padding_workers": g.workers - g.active_count,
            "padding_fraction": g.padding_fraction, "fitted_rows": self.fitted_rows, "codecs": self.codecs,
            "tile_bytes_fp32": g.tile_bytes(4),
            "tile_bytes_int8": self.tile_bytes_int8 if self.int8_bytes_memory is not None else None,
            "bytes_memory": self.bytes_memory, "bytes_disk": self.bytes_disk,
            "int8_bytes_memory": self.int8_bytes_memory, "int8_bytes_disk": self.int8_bytes_disk,
            "gate": self.gate, "stats": None if self.stats is None else self.stats.to_dict(),
        })

    def text(self) -> str:
        """A few indented lines for humans."""
        g = self.grid
        fitted = f"; fitted on {self.fitted_rows} rows" if self.fitted_rows is not None else ""
        lines = [
            f"pipe {self.pipe + 1}: {g}",
            f"  padding {100 * g.padding_fraction:.2f}%, {g.active_count}/{g.workers} workers active "
            f"({g.workers - g.active_count} padding-only){fitted}",
            f"  tile {g.tile_out} × {g.tile_in}: {_human(g.tile_bytes(4))} fp32"
            + (f", {_human(self.tile_bytes_int8)} INT8 with scales" if self.int8_bytes_memory is not None else ""),
            f"  tiles {_human(self.bytes_memory)} fp32 in memory, {_human(self.bytes_disk)} on disk; codecs "
            f"{' + '.join(self.codecs)}",
        ]
        if self.int8_bytes_memory is not None:
            lines.append(f"  INT8 tiles + scales {_human(self.int8_bytes_memory)} in memory, "
                         f"{_human(self.int8_bytes_disk)} on disk")
        if self.gate is None:
            lines.append("  gate: none (train one with `prismoe fit-gates`)")
        else:
            gt = self.gate
            extra = (f", ‖W_g‖_F {gt['weight_norm']:.4g}, bias {gt['bias_min']:.4g} … {gt['bias_max']:.4g}"
                     if "weight_norm" in gt else "")
            lines.append(f"  gate: [{gt['shape'][0]} × {gt['shape'][1]}]{extra}")
        if self.stats is not None:
            s = self.stats.summary()
            lines.append(f"  tile norms: min {s['tile_norm_min']:.4g} (worker {s['tile_norm_argmin']}), median "
                         f"{s['tile_norm_median']:.4g}, max {s['tile_norm_max']:.4g} (worker "
                         f"{s['tile_norm_argmax']}); whole pipe {s['frobenius']:.4g}, absmax {s['absmax']:.4g}, "
                         f"non-finite {s['nonfinite']}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`inspect_adapter` reports about an adapter store."""

    url: str  # where the store is
    version: int  # format version
    d_in: int  # input width M
    d_out: int  # output width N
    mode: str  # "joint" or "independent"
    alphas: list[float]  # pipe weights
    complete: bool  # True once the fit has written every tile
    options: dict  # the store's encoding options
    fit: dict  # the "fit" attribute: settings, source pairs, ridge, row counts, plan, timings
    metrics: dict  # the "metrics" attribute: held-out relative error and R² per pipe and combined
    gates: dict  # the "gates" attribute: gate-training settings, split and metrics ({} before fit-gates)
    int8: dict  # the "int8" attribute ({} before quantize)
    jobs: dict  # progress record name -> [done, units]
    pipes: list[PipeReport] = field(default_factory=list)  # the pipes inspected

    def to_dict(self) -> dict:
        """One JSON object for ``--json``."""
        return jsonable({
            "url": self.url, "format": "adapter", "version": self.version, "d_in": self.d_in, "d_out": self.d_out,
            "mode": self.mode, "alphas": self.alphas, "complete": self.complete, "options": self.options,
            "fit": self.fit, "metrics": self.metrics, "gates": self.gates, "int8": self.int8, "jobs": self.jobs,
            "pipes": [p.to_dict() for p in self.pipes],
        })

    def text(self) -> str:
        """The human summary of the store."""
        opts = ", ".join(f"{k} {v}" for k, v in self.options.items())
        state = "complete" if self.complete else "INCOMPLETE: re-run `prismoe fit` to finish it"
        lines = [f"{self.url}: adapter store, format version {self.version} ({opts})",
                 f"  {self.d_in} → {self.d_out} (d_in → d_out), {self.mode} tiles, {len(self.alphas)} pipes, "
                 f"alphas {', '.join(f'{a:.4g}' for a in self.alphas)}; {state}"]
        lines += _fit_lines(self.fit, self.metrics)
        lines += _gate_lines(self.gates)
        if self.int8:
            lines.append(f"  INT8: {self.int8.get('scheme', '?')}, "
                         + ("complete" if self.int8.get("complete") else "INCOMPLETE (re-run `prismoe quantize`)"))
        if self.jobs:
            lines.append("  jobs: " + ", ".join(f"{k} {d}/{u}" for k, (d, u) in self.jobs.items()))
        return "\n".join(lines + [p.text() for p in self.pipes])

    def heatmaps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Tile-norm heatmap of each pipe that has statistics."""
        return {f"pipe {p.pipe + 1} tile norms": (p.stats.on_grid("norm"), p.stats.on_grid("padding"))
                for p in self.pipes if p.stats is not None}

    def plot(self, out_dir) -> list:
        """Write one tile-norm heatmap per pipe as a PNG into ``out_dir``; return their paths."""
        from .plots import report_heatmaps

        return report_heatmaps(self, out_dir)


def _fit_lines(fit: dict, metrics: dict) -> list[str]:
    if not fit:
        return ["  fit: none recorded"]
    settings = {k: v for k, v in (fit.get("settings") or {}).items() if k != "grids"}
    lines = ["  fit: " + ", ".join(f"{k} {_short(v)}" for k, v in settings.items())]
    src = fit.get("pairs") or {}
    counts = fit.get("counts") or {}
    if src or counts:
        lines.append(f"    on {src.get('url', '?')} ({src.get('rows', '?')} rows): "
                     + ", ".join(f"{v} {k}" for k, v in counts.items()) + " rows")
    if fit.get("ridge"):
        lines.append("    ridge λ: " + ", ".join(f"{k} {_short(v)}" for k, v in fit["ridge"].items()))
    if metrics:
        lines.append(f"  held-out metrics on {metrics.get('holdout_rows', '?')} rows (relative error, R²):")
        rows = [(f"pipe {p + 1}", m) for p, m in enumerate(metrics.get("pipes") or [])]
        rows += [("combined", metrics["combined"])] if metrics.get("combined") else []
        lines += [f"    {name:<10}{_short(m.get('rel_err')):>12}{_r2(m.get('r2')):>12}" for name, m in rows]
        lines += [f"    warning: {w}" for w in metrics.get("warnings") or []]
    return lines


def _r2(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else "—"


def _gate_lines(gates: dict) -> list[str]:
    if not gates:
        return ["  gates: none (train them with `prismoe fit-gates`)"]
    s = gates.get("settings") or {}
    lines = [f"  gates: {'trained' if gates.get('complete') else 'training INCOMPLETE (re-run `prismoe fit-gates`)'}",
             "    settings: " + ", ".join(f"{k} {_short(v)}" for k, v in s.items())]
    m = gates.get("metrics") or {}
    if m:
        before = m.get("before") or {}
        cells = [(f"{k} gate", before[k]) for k in ("zero", "init") if k in before]
        cells += [("trained gate", m["after"])] if m.get("after") else []
        cells += [("dense (ρ=1)", before["dense"])] if "dense" in before else []
        lines.append("    held-out relative error: " + ", ".join(f"{k} {_short(v.get('rel_err'))}" for k, v in cells)
                     + f" (best epoch {m.get('best_epoch')} of {m.get('epochs_run')})")
    return lines


def inspect_adapter(url, *, tensor: str | None = None, stats: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                    progress: ProgressFn | None = None, storage_options: dict | None = None) -> AdapterReport:
    """Inspect an adapter store: shape, mode, fit settings and metrics, gate settings, and per pipe
    (every pipe, or only ``tensor`` such as ``"pipe1"``) its grid, bytes (fp32 and INT8), gate and
    per-tile statistics streamed a few tiles at a time (complete adapters only).

    >>> from prismoe_store.adapter import AdapterStore
    >>> g = GridSpec(d_in=4, d_out=6, rows=2, cols=2, tile_out=4, tile_in=2)
    >>> a = AdapterStore.create("memory://doc-inspect-a", grids=[g], overwrite=True)
    >>> for r in range(2): a.write_band(0, r, np.full((4, 4), r + 1.0, np.float32))
    >>> a.update_attrs(complete=True)
    >>> r = inspect_adapter("memory://doc-inspect-a")
    >>> r.pipes[0].stats.norm.round(3).tolist(), r.pipes[0].gate  # band 1 has 2 true rows of 2.0
    ([2.828, 2.828, 4.0, 4.0], None)
    """
    from .adapter import AdapterStore

    store = AdapterStore.open(url, storage_options=storage_options)
    attrs = store.attrs()
    names = [f"pipe{p + 1}" for p in range(store.n_pipes)]
    pipes = [names.index(_only(names, tensor, str(url)))] if tensor is not None else range(store.n_pipes)
    grids = store.grids
    total, done = sum(grids[p].active_count for p in pipes), 0
    reports = []
    for p in pipes:
        g, group = grids[p], store.group[f"pipe{p + 1}"]
        tiles = store.tiles(p)
        int8 = store.int8_arrays(p) if "tiles_int8" in group and "scales" in group else None
        pipe_stats = None
        if stats and store.complete:
            tick = None if progress is None else (lambda d, _t, o=done: progress(o + d, total))
            pipe_stats = tile_stats(_Checked(tiles, (g.d_out, g.d_in), f"tiles of pipe {p} in {url}"), g,
                                    max_bytes=max_bytes, progress=tick)
            done += g.active_count
        reports.append(PipeReport(
            pipe=p, grid=g, fitted_rows=group.attrs.get("rows"),
            codecs=[_codec_name(c) for c in tiles.compressors], bytes_memory=int(tiles.nbytes),
            bytes_disk=int(tiles.nbytes_stored()),
            int8_bytes_memory=None if int8 is None else int(sum(a.nbytes for a in int8)),
            int8_bytes_disk=None if int8 is None else int(sum(a.nbytes_stored() for a in int8)),
            gate=_gate_info(store, p, stats), stats=pipe_stats))
    jobs = {}
    if "_progress" in store.group:
        for name, _ in sorted(store.group["_progress"].arrays()):
            record = Progress.open(store.group, name)
            jobs[name] = [len(record.done()), record.units]
    return AdapterReport(
        url=str(url), version=int(attrs[FORMAT_KEY]["version"]), d_in=store.d_in, d_out=store.d_out,
        mode=store.mode, alphas=store.alphas, complete=store.complete, options=dict(attrs.get("options", {})),
        fit=dict(attrs.get("fit") or {}), metrics=dict(attrs.get("metrics") or {}),
        gates=dict(attrs.get("gates") or {}), int8=dict(attrs.get("int8") or {}), jobs=jobs, pipes=reports)


def _gate_info(store, pipe: int, stats: bool) -> dict | None:
    """A pipe's gate: None without one; its shape, and with ``stats`` its norm and bias range."""
    group = store.group[f"pipe{pipe + 1}"]
    if "gate_weight" not in group:
        return None
    info = {"shape": list(group["gate_weight"].shape)}
    if stats:
        w, b = store.read_gate(pipe)
        w64, b64 = np.asarray(w, np.float64), np.asarray(b, np.float64)
        info.update(weight_norm=float(np.linalg.norm(w64)), bias_min=float(b64.min()), bias_max=float(b64.max()),
                    bias_mean=float(b64.mean()))
    return info


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


def jsonable(obj):
    """``obj`` ready for ``json.dumps(..., allow_nan=False)``: non-finite floats become ``None``,
    NumPy scalars Python ones, tuples lists, keys strings (recursively).

    >>> jsonable({"a": (1.0, float("nan")), 2: np.float32(0.5)})
    {'a': [1.0, None], '2': 0.5}
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _short(v, width: int = 80) -> str:
    """A value for one line of text: floats with 4 significant digits, long values cut."""
    if isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, (list, tuple)):
        text = "[" + ", ".join(_short(x, width) for x in v) + "]"
    else:
        text = str(v)
    return text if len(text) <= width else text[:width - 1] + "…"


def _pretty(d: dict, indent: str) -> list[str]:
    """A nested dict as ``key: value`` lines, indented one step deeper per level."""
    lines = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            lines += [f"{indent}{k}:"] + _pretty(v, indent + "  ")
        else:
            lines.append(f"{indent}{k}: {_short(v, 100)}")
    return lines


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
