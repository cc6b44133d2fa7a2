"""Inspect a weights store: per tensor its grid, bytes, codecs, progress and per-tile statistics.

:func:`inspect_weights` is the ``"weights"`` entry of :data:`prismoe_store.inspection.common.INSPECTORS`
(reach it through :func:`prismoe_store.inspection.common.inspect_store`); it returns a :class:`WeightsReport`
with one :class:`TensorReport` per tensor, whose statistics are streamed a few tiles at a time.

>>> from prismoe_store.grid import plan_grid
>>> ws = WeightsStore.create("memory://doc-inspect-weights", overwrite=True)
>>> ws.write_matrix("w", np.ones((8, 4), np.float32), plan_grid(4, 8, 4))
>>> rep = inspect_weights("memory://doc-inspect-weights")
>>> print(rep.text().splitlines()[2])
tensor 'w' [complete]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prismoe_store.errors import TensorNotFoundError
from prismoe_store.grid import GridSpec
from prismoe_store.inspection.common import (
    DEFAULT_MAX_BYTES,
    CheckedRegion,
    ProgressFn,
    TileStats,
    codec_names,
    human_bytes,
    jsonable,
    tile_stats,
)
from prismoe_store.stores.formats import FORMAT_KEY
from prismoe_store.stores.progress import Progress
from prismoe_store.stores.weights import WeightsStore


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
            f"  bytes {human_bytes(self.bytes_memory)} in memory, {human_bytes(self.bytes_disk)} on disk "
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
        from prismoe_store.plots import report_heatmaps

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
            codecs=codec_names(arr), bytes_memory=int(arr.nbytes),
            bytes_disk=int(arr.nbytes_stored()), source={k: v for k, v in attrs.items() if k not in own},
            stats=tile_stats(CheckedRegion(arr, arr.shape, f"{name!r} in {url}"), grid, max_bytes=max_bytes,
                             progress=progress) if stats and complete else None,
        ))
    return WeightsReport(url=str(url), format="weights", version=int(store.group.attrs[FORMAT_KEY]["version"]),
                         options=dict(store.group.attrs.get("options", {})), tensors=reports)


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
