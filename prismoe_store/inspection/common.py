"""Inspect any prismoe store: dispatch on its format, and the helpers every inspector shares.

- :func:`inspect_store` reads a store's format attribute (:func:`store_format`) and hands it to
  the inspector of that format (:data:`INSPECTORS`): :func:`prismoe_store.inspection.weights.inspect_weights`,
  :func:`prismoe_store.inspection.pairs.inspect_pairs`, :func:`prismoe_store.inspection.adapter.inspect_adapter`;
  each returns a :class:`Report` (text, JSON and PNG plots).
- :func:`tile_stats` computes per-tile statistics (Frobenius norm, mean, std, absmax, share of
  zeros) of a matrix on its grid, reading a few tiles at a time (weights tensors, adapter pipes).
- Shared by the inspectors and :mod:`prismoe_store.inspection.compare`: :class:`CheckedRegion` (reads that
  refuse missing chunks), :func:`block_shape` (chunk-aligned read blocks within a byte budget),
  :func:`pick_name`, :func:`codec_names`, and :func:`jsonable` / :func:`short_value` /
  :func:`human_bytes` for the reports' JSON and text.

Statistics are streamed tile by tile or block by block: never a whole matrix in RAM.

>>> from prismoe_store.grid import GridSpec
>>> w = np.arange(15, dtype=np.float32).reshape(5, 3)
>>> s = tile_stats(w, GridSpec(d_in=3, d_out=5, rows=4, cols=1, tile_out=2, tile_in=4))
>>> s.norm.round(3).tolist(), s.padding.tolist()
([7.416, 21.237, 22.561, 0.0], [False, False, False, True])
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from prismoe_store.errors import DataError, StoreFormatError, TensorNotFoundError
from prismoe_store.grid import GridSpec
from prismoe_store.stores.formats import FORMAT_KEY, open_root
from prismoe_store.stores.verified import check_stored, reading

ProgressFn = Callable[[int, int], None]
DEFAULT_MAX_BYTES = 16 << 20  # float64 bytes per block read (tiles, bands); peak RSS is a few times this

# Store format name -> "module:function" of its inspector, imported only when used. An inspector
# is called as fn(url, *, tensor, stats, max_bytes, progress, storage_options) and returns a Report.
# A new store kind adds one line here.
INSPECTORS: dict[str, str] = {
    "weights": "prismoe_store.inspection.weights:inspect_weights",
    "pairs": "prismoe_store.inspection.pairs:inspect_pairs",
    "adapter": "prismoe_store.inspection.adapter:inspect_adapter",
}


class Report(Protocol):
    """What every inspector returns: a human summary, a JSON object and PNG plots."""

    def text(self) -> str: ...  # multi-line human summary

    def to_dict(self) -> dict: ...  # JSON-ready (non-finite floats as None)

    def plot(self, out_dir) -> list: ...  # write the report's PNGs into out_dir, return their paths


# -- inspecting stores -----------------------------------------------------------------------


def store_format(url, *, storage_options: dict | None = None) -> str:
    """The format name (``"weights"``, ``"pairs"``, ``"adapter"``, ...) of the prismoe store at ``url``.

    >>> from prismoe_store.stores.weights import WeightsStore
    >>> _ = WeightsStore.create("memory://doc-format", overwrite=True)
    >>> store_format("memory://doc-format")
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
    >>> from prismoe_store.stores.weights import WeightsStore
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
        out: dict[str, Any] = {"summary": self.summary()}
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


# -- reading stores --------------------------------------------------------------------------


class CheckedRegion:
    """The region ``[:shape[0], :shape[1]]`` of a 2-D Zarr array, sliced like NumPy; each read first
    checks that the chunks under it exist (Zarr reads a missing chunk as zeros, and the writers here
    write every chunk, so a missing one is damage) and turns decoding failures into
    :class:`~prismoe_store.errors.CorruptStoreError`.

    >>> import zarr
    >>> z = zarr.open_group("memory://doc-checked", mode="w").create_array("a", shape=(4, 2), chunks=(2, 2), dtype="f4")
    >>> z[:2] = 1.0
    >>> float(CheckedRegion(z, (4, 2), "demo")[0:2, 0:2].sum())
    4.0
    >>> CheckedRegion(z, (4, 2), "demo")[2:4, 0:2]
    Traceback (most recent call last):
    prismoe_store.errors.CorruptStoreError: demo: stored chunk a/c/1/0 is missing or empty
    """

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


def codec_names(array) -> list[str]:
    """The bytes-to-bytes codecs of a Zarr array's chunks, in order, as short names (``zstd(3)``).

    >>> import zarr
    >>> z = zarr.create_array("memory://doc-codecs", shape=(2,), dtype="f4", overwrite=True,
    ...                       compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()])
    >>> codec_names(z)
    ['zstd(3)', 'crc32c']
    """
    return [_codec_name(c) for c in array.compressors]


def _codec_name(codec) -> str:
    name = type(codec).__name__.removesuffix("Codec").lower()
    level = getattr(codec, "level", None) or getattr(codec, "clevel", None)
    return f"{name}({level})" if level else name


def chunk_shape(m) -> tuple[int, int] | None:
    """The 2-D chunk shape of ``m`` (a Zarr array, a :class:`CheckedRegion`), or None without one.

    >>> import zarr
    >>> chunk_shape(zarr.create_array("memory://doc-chunks", shape=(4, 4), chunks=(2, 4), dtype="f4", overwrite=True))
    (2, 4)
    >>> chunk_shape(np.zeros((4, 4))) is None
    True
    """
    chunks = getattr(m, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 2 and all(isinstance(c, int) for c in chunks):
        return chunks
    return None


def block_shape(shape: tuple[int, int], chunks: tuple[int, int] | None, max_bytes: int) -> tuple[int, int]:
    """Rows and cols of a block: whole chunk multiples, within ``max_bytes`` of float64 where possible.

    >>> block_shape((100, 10), (4, 10), 8 * 80), block_shape((100, 10), (4, 5), 8), block_shape((100, 10), None, 8)
    ((8, 10), (4, 5), (1, 10))
    """
    rows, cols = shape
    unit_r, unit_c = chunks if chunks else (1, cols)
    unit_r, unit_c = max(1, min(unit_r, rows)), max(1, min(unit_c, cols))
    budget = max(1, max_bytes // 8)
    if unit_r * cols <= budget:  # whole bands of chunk rows
        return unit_r * max(1, budget // (unit_r * cols)), cols
    return unit_r, min(cols, unit_c * max(1, budget // (unit_r * unit_c)))


def pick_name(names: list[str], wanted: str | None, where: str, fallback: str | None = None) -> str:
    """The item of ``names`` to use: ``wanted`` (which must be there), else the only one, else
    ``fallback``; raises :class:`~prismoe_store.errors.TensorNotFoundError` naming the choices.

    >>> pick_name(["x", "z"], "z", "pairs"), pick_name(["w"], None, "store"), pick_name(["a", "b"], None, "s", "b")
    ('z', 'w', 'b')
    """
    if wanted is not None:
        if wanted not in names:
            raise TensorNotFoundError(f"tensor {wanted!r} is not in {where} (it has: {', '.join(names) or 'none'})")
        return wanted
    if fallback is not None and len(names) != 1:
        return pick_name(names, fallback, where)
    if len(names) != 1:
        raise TensorNotFoundError(
            f"{where} holds {len(names)} tensors ({', '.join(names) or 'none'}): name one with --tensor")
    return names[0]


# -- text and JSON ---------------------------------------------------------------------------


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


def _num(v):
    return v if isinstance(v, (int, bool)) or (isinstance(v, float) and math.isfinite(v)) else None


def short_value(v, width: int = 80) -> str:
    """A value for one line of text: floats with 4 significant digits, long values cut.

    >>> short_value([0.123456, "adam"]), short_value("x" * 20, 8)
    ('[0.1235, adam]', 'xxxxxxx…')
    """
    if isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, (list, tuple)):
        text = "[" + ", ".join(short_value(x, width) for x in v) + "]"
    else:
        text = str(v)
    return text if len(text) <= width else text[:width - 1] + "…"


def human_bytes(n: float) -> str:
    """A byte count in B, KiB, MiB, GiB or TiB.

    >>> human_bytes(512), human_bytes(3 << 20), human_bytes(5 << 40)
    ('512 B', '3.00 MiB', '5.00 TiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
