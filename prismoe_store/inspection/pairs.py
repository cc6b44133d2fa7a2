"""Inspect a pairs store: rows, widths, chunks, bytes, provenance and per-column statistics.

- :func:`column_stats` computes per-column statistics (mean, std, absmax, non-finite count) of
  an array's rows, reading chunk-aligned row blocks (a pairs store's ``x`` and ``z``), and a
  block-RMS heatmap of how values vary along the rows.
- :func:`inspect_pairs` is the ``"pairs"`` entry of :data:`prismoe_store.inspection.common.INSPECTORS`
  (reach it through :func:`prismoe_store.inspection.common.inspect_store`); it returns a :class:`PairsReport`.

>>> from prismoe_store.stores.pairs import PairsStore
>>> p = PairsStore.create("memory://doc-inspect-pairs", d_in=2, d_out=1, rows_per_chunk=2, overwrite=True)
>>> _ = p.append(np.array([[1, 2], [3, 4], [5, 6]], np.float32), np.ones((3, 1), np.float32))
>>> rep = inspect_pairs("memory://doc-inspect-pairs")
>>> rep.rows, rep.stats["x"].mean.tolist(), rep.stats["z"].summary()["constant_columns"]
(3, [3.0, 4.0], 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from prismoe_store.errors import DataError
from prismoe_store.inspection.common import (
    DEFAULT_MAX_BYTES,
    CheckedRegion,
    ProgressFn,
    block_shape,
    chunk_shape,
    codec_names,
    human_bytes,
    jsonable,
    pick_name,
    short_value,
)
from prismoe_store.stores.formats import FORMAT_KEY
from prismoe_store.stores.verified import reading

# -- per-column statistics -------------------------------------------------------------------


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
    step_r, step_c = block_shape(shape, chunks, max_bytes)
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
    step_r, step_c, total = _column_blocks((rows, cols), chunk_shape(array), max_bytes, row_bins)
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


# -- the report --------------------------------------------------------------------------------


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
            f"  bytes {human_bytes(self.bytes_memory)} in memory, {human_bytes(self.bytes_disk)} on disk "
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
        from prismoe_store.plots import pairs_plots

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

    >>> from prismoe_store.stores.pairs import PairsStore
    >>> p = PairsStore.create("memory://doc-inspect-p", d_in=3, d_out=2, rows_per_chunk=2, overwrite=True)
    >>> _ = p.append(np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((4, 2), np.float32))
    >>> r = inspect_pairs("memory://doc-inspect-p")
    >>> r.rows, r.stats["x"].mean.tolist(), r.stats["z"].std.tolist()
    (4, [4.5, 5.5, 6.5], [0.0, 0.0])
    """
    from prismoe_store.data.synth import truth_summary
    from prismoe_store.stores.pairs import PairsStore

    store = PairsStore.open(url, storage_options=storage_options)
    rows = store.rows  # read once: a concurrent append may commit more while we read
    arrays = {"x": store.x, "z": store.z}
    names = [pick_name(list(arrays), tensor, str(url))] if tensor is not None else list(arrays)
    plans = {n: _column_blocks((rows, arrays[n].shape[1]), arrays[n].chunks, max_bytes, 64) for n in names}
    total, offset = sum(p[2] for p in plans.values()), 0
    col_stats = {}
    if stats:
        for n in names:
            tick = None if progress is None else (lambda d, _t, o=offset: progress(o + d, total))
            col_stats[n] = column_stats(CheckedRegion(arrays[n], (rows, arrays[n].shape[1]), f"{n} of {url}"),
                                        max_bytes=max_bytes, progress=tick)
            offset += plans[n][2]
    return PairsReport(
        url=str(url), version=int(store.group.attrs[FORMAT_KEY]["version"]), rows=rows,
        capacity=int(store.x.shape[0]), d_in=store.d_in, d_out=store.d_out, rows_per_chunk=store.rows_per_chunk,
        chunks={n: list(a.chunks) for n, a in arrays.items()},
        codecs={n: codec_names(a) for n, a in arrays.items()},
        bytes_memory=rows * (store.d_in + store.d_out) * 4,
        bytes_disk=sum(int(a.nbytes_stored()) for a in arrays.values()),
        provenance=store.provenance, truth=truth_summary(store), stats=col_stats)


def _pretty(d: dict, indent: str) -> list[str]:
    """A nested dict as ``key: value`` lines, indented one step deeper per level."""
    lines = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            lines += [f"{indent}{k}:"] + _pretty(v, indent + "  ")
        else:
            lines.append(f"{indent}{k}: {short_value(v, 100)}")
    return lines
