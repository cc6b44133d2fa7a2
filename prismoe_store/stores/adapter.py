"""The adapter store: per pipe, the grid, the tiles, optional INT8 tiles, and the gate.

Layout of a Zarr v3 group (format ``"adapter"``, version 1)::

    /                    attrs: d_in, d_out, mode, alphas, fit, metrics, gates, complete
    /pipe{p+1}/          attrs: grid (GridSpec.to_dict), rows (training rows it was fitted on)
        tiles            float32 [d_out_pad, d_in_pad], chunk (tile_out, tile_in): one chunk per tile
        tiles_int8       int8    [d_out_pad, d_in_pad], chunk (tile_out, tile_in)      (after quantize)
        scales           float32 [d_out_pad, cols],     chunk (tile_out, 1): per-row absmax / 127
        gate_weight      float32 [workers, d_in]                                      (after fit-gates)
        gate_bias        float32 [workers]
    /_progress/...       done flags of resumable jobs (fit bands, quantized tiles, ...)

A head adapter (``layout = "partition"``, ``combine = "select"``, built by ``prismoe head``) has
band tiles (``cols = 1``, ``tile_in = d_in``) and stores only true rows; its pipes split the
(permuted) output rows between them, and it adds::

    /order               int32   [d_out]: position in the adapter's row order → token id
    /gate_weight         float32 [bands, d_in]: one gate score per band, all pipes together
    /gate_bias           float32 [bands]
    /pipe{p+1}/tiles     float32 [rows of this pipe, d_in], chunk (band_rows, d_in)

Pipes are indexed from 0 in the API (``pipe=0`` is stored as ``pipe1``, the seed's "pipe 1").
The runtime reads an adapter through :class:`prismoe_store.runtime.tile_source.TileSource`, not Zarr.

>>> import numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores.adapter import AdapterStore
>>> g = plan_grid(6, 10, 8)
>>> a = AdapterStore.create("memory://doc-adapter", grids=[g], overwrite=True)
>>> a.write_band(0, 0, np.ones((g.tile_out, g.d_in_pad), np.float32))
>>> a.read_tile(0, 0).shape == g.tile_shape
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import zarr

from prismoe_store.errors import (
    CorruptStoreError,
    DataError,
    IncompleteStoreError,
    PrismoeError,
    StoreError,
    StoreFormatError,
)
from prismoe_store.grid import GridSpec, plan_partition
from prismoe_store.stores.adapter_bands import PartitionBands
from prismoe_store.stores.formats import (
    StoreOptions,
    create_checked,
    create_chunked,
    existing_kind,
    location,
    open_checked,
    open_root,
)
from prismoe_store.stores.progress import Progress
from prismoe_store.stores.records import FitMetrics, FitRecord, GatesRecord
from prismoe_store.stores.verified import damaged_chunks, finite, reading

ADAPTER_FORMAT, ADAPTER_VERSION = "adapter", 1
MODES = ("joint", "independent")
LAYOUTS = ("ensemble", "partition")  # each pipe estimates all of z / the pipes split the output rows
COMBINES = ("mix", "select")  # gate-weighted sum of tiles / selected bands exact, the rest `fill`
RETRAIN_GATES = "train the gates again (prismoe fit-gates --restart)"  # what repairs a lost or damaged gate


class AdapterStore(PartitionBands):
    """A PrisMoE adapter in a Zarr v3 store (see the module docstring for the layout)."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group  # the root Zarr group
        self.url = url  # where the store lives
        self._arrays: dict[tuple[int, str], zarr.Array] = {}  # open array handles, (pipe, name) -> array
        self._grids: list[GridSpec] | None = None  # pipe grids (fixed at creation), read once

    # -- create / open ---------------------------------------------------------------------------
    @classmethod
    def create(cls, url, *, grids: Sequence[GridSpec], mode: str = "joint", alphas: Sequence[float] | None = None,
               options: StoreOptions | None = None, attrs: dict | None = None, overwrite: bool = False
               ) -> AdapterStore:
        """Create an adapter with one pipe per grid (tiles all zero until written).

        >>> from prismoe_store.grid import plan_pipes
        >>> a = AdapterStore.create("memory://doc-adapter-c", grids=plan_pipes(64, 100, 8), overwrite=True)
        >>> a.n_pipes, a.alphas
        (3, [0.3333333333333333, 0.3333333333333333, 0.3333333333333333])
        """
        grids = list(grids)
        if not grids:
            raise DataError("an adapter needs at least one pipe grid")
        partition = (attrs or {}).get("layout") == "partition"
        d_in, d_out = grids[0].d_in, (sum(g.d_out for g in grids) if partition else grids[0].d_out)
        if any(g.d_in != d_in or (g.d_out != d_out and not partition) for g in grids):
            raise DataError("all pipe grids must cover the same d_in → d_out")
        if mode not in MODES:
            raise DataError(f"mode must be one of {MODES}, got {mode!r}")
        alphas = _check_alphas(alphas, len(grids))
        options = options or StoreOptions()
        if overwrite:  # --overwrite replaces only an adapter of the same kind
            cls.check_output(url, "partition" if partition else "ensemble", storage_options=options.storage_options)
        group = create_checked(url, ADAPTER_FORMAT, ADAPTER_VERSION, overwrite=overwrite,
                               storage_options=options.storage_options,
                               attrs={"d_in": d_in, "d_out": d_out, "mode": mode, "alphas": alphas,
                                      "n_pipes": len(grids), "complete": False, **(attrs or {})})
        for p, g in enumerate(grids):
            pg = group.create_group(f"pipe{p + 1}", attributes={"grid": g.to_dict()})
            create_chunked(pg, "tiles", _stored_shape(g), g.tile_shape, "float32", options)
        group.attrs["options"] = {"compressor": options.compressor, "level": options.level}
        return cls(group, str(url))

    @classmethod
    def open(cls, url, mode: str = "r", *, storage_options: dict | None = None, require_complete: bool = False
             ) -> AdapterStore:
        """Open an adapter store (format and version checked); optionally insist the fit finished."""
        group = open_checked(url, ADAPTER_FORMAT, ADAPTER_VERSION, mode, storage_options=storage_options)
        store = cls(group, str(url))
        if require_complete and not group.attrs.get("complete"):
            job = "prismoe head" if group.attrs.get("layout") == "partition" else "prismoe fit"
            raise IncompleteStoreError(f"adapter {url} is not finished: re-run `{job}` to complete it")
        return store

    @classmethod
    def check_output(cls, url, layout: str, *, storage_options: dict | None = None) -> str:
        """``url`` (as :func:`~prismoe_store.stores.formats.location` writes it) when it holds no
        adapter of the other kind than ``layout`` would write: a fitted adapter (``"ensemble"``) and a
        head adapter (``"partition"``) never replace each other, with ``--overwrite`` or without
        (:class:`~prismoe_store.errors.StoreFormatError`). Cheap: reads the root attributes only.

        >>> a = AdapterStore.create_partition("memory://doc-kind", d_in=4, d_out=8, band_rows=4, overwrite=True)
        >>> AdapterStore.check_output("memory://doc-kind", "ensemble")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        prismoe_store.errors.StoreFormatError: memory://doc-kind holds a head adapter, not a fitted adapter: ...
        """
        url = location(url, write=True)
        if existing_kind(url, storage_options=storage_options) == ADAPTER_FORMAT:
            found = open_root(url, "r", storage_options=storage_options).attrs.get("layout", "ensemble")
            if found != layout:
                kinds = {"ensemble": "a fitted adapter", "partition": "a head adapter"}
                have, want = kinds.get(found, f"an adapter of layout {found!r}"), kinds.get(layout, layout)
                raise StoreFormatError(f"{url} holds {have}, not {want}: refusing to replace it (--overwrite "
                                       f"replaces only {want}); choose another output")
        return url

    @classmethod
    def create_partition(cls, url, *, d_in: int, d_out: int, band_rows: int | None = None,
                         options: StoreOptions | None = None, attrs: dict | None = None,
                         overwrite: bool = False) -> AdapterStore:
        """Create a head adapter: band tiles in the ``partition`` layout, ``select`` combine, fill −inf.

        Its tiles, row order and gate are written afterwards (:meth:`write_order`,
        :meth:`write_band_tiles`, :meth:`write_band_gate`); see :mod:`prismoe_store.head.build`.

        >>> a = AdapterStore.create_partition("memory://doc-part", d_in=4, d_out=10, band_rows=4, overwrite=True)
        >>> a.layout, a.combine, a.n_bands, [g.d_out for g in a.grids]
        ('partition', 'select', 3, [8, 2])
        """
        grids = plan_partition(d_in, d_out, band_rows)
        store = cls.create(url, grids=grids, options=options, overwrite=overwrite,
                           attrs={"layout": "partition", "combine": "select", "fill": "-inf",
                                  "band_rows": grids[0].tile_out, **(attrs or {})})
        return store

    # -- description -----------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        """``"ensemble"`` (every pipe estimates all outputs; fitted adapters) or ``"partition"``
        (the pipes split the output rows; head adapters)."""
        return str(self.group.attrs.get("layout", "ensemble"))

    @property
    def combine(self) -> str:
        """``"mix"`` (gate-weighted sum of tiles) or ``"select"`` (selected bands exact, the rest fill)."""
        return str(self.group.attrs.get("combine", "mix"))

    @property
    def d_in(self) -> int:
        """Input width M."""
        return int(self.group.attrs["d_in"])

    @property
    def d_out(self) -> int:
        """Output width N."""
        return int(self.group.attrs["d_out"])

    @property
    def n_pipes(self) -> int:
        """Number of pipes."""
        return int(self.group.attrs["n_pipes"])

    @property
    def mode(self) -> str:
        """Fit mode, ``"joint"`` or ``"independent"``: it fixes how gate weights combine tiles."""
        return str(self.group.attrs["mode"])

    @property
    def alphas(self) -> list[float]:
        """Pipe weights α (sum 1)."""
        return [float(a) for a in self.group.attrs["alphas"]]

    @property
    def grids(self) -> list[GridSpec]:
        """One grid per pipe."""
        if self._grids is None:
            self._grids = [GridSpec.from_dict(self._pipe(p).attrs["grid"]) for p in range(self.n_pipes)]
        return list(self._grids)

    @property
    def options(self) -> StoreOptions:
        """The encoding options the store was created with."""
        return StoreOptions(**self.group.attrs.get("options", {}))

    @property
    def complete(self) -> bool:
        """True once the fit has written every tile."""
        return bool(self.group.attrs.get("complete"))

    def attrs(self) -> dict:
        """All root attributes (fit settings, metrics, gate settings, ...)."""
        return dict(self.group.attrs)

    def fit_record(self) -> FitRecord | None:
        """The ``fit`` attribute (how ``prismoe fit`` made the tiles), or ``None`` when there is none
        (a head adapter); a damaged record raises :class:`CorruptStoreError`."""
        return self._record("fit", FitRecord)

    def metrics_record(self) -> FitMetrics | None:
        """The fit's held-out scores (``metrics``), or ``None`` (no fit, or a fit without held-out rows)."""
        return self._record("metrics", FitMetrics)

    def gates_record(self) -> GatesRecord | None:
        """The ``gates`` attribute (how the gates were trained), or ``None`` before gate training.

        >>> from prismoe_store.grid import plan_grid
        >>> a = AdapterStore.create("memory://doc-gates-rec", grids=[plan_grid(4, 4, 2)], overwrite=True)
        >>> a.gates_record() is None, a.gate_settings()
        (True, {})
        >>> a.update_attrs(gates=GatesRecord(settings={"sparsity": 0.5}, complete=True).to_dict())
        >>> a.gates_record().finished, a.gate_settings()["sparsity"]
        (True, 0.5)
        """
        return self._record("gates", GatesRecord)

    def gate_settings(self) -> dict:
        """The settings the gates were trained with (``{}`` before gate training)."""
        record = self.gates_record()
        return dict(record.settings) if record is not None else {}

    def _record(self, name: str, kind):
        value = self.group.attrs.get(name)
        if value is None:
            return None
        try:
            return kind.from_dict(value)
        except StoreError as e:
            raise CorruptStoreError(f"adapter {self.url}: the {name!r} attribute is damaged: {e}") from None

    def update_attrs(self, **entries) -> None:
        """Merge entries into the root attributes (write metadata last, after the data)."""
        self.group.attrs.update(entries)

    def set_alphas(self, alphas: Sequence[float]) -> None:
        """Replace the pipe weights (validated: one per pipe, non-negative, sum 1)."""
        self.group.attrs["alphas"] = _check_alphas(alphas, self.n_pipes)

    def progress(self, name: str, units: int) -> Progress:
        """The resumable-job record ``name`` with ``units`` units (created on first use)."""
        return Progress.create(self.group, name, units)

    def _pipe(self, pipe: int) -> zarr.Group:
        if not 0 <= pipe < self.n_pipes:
            raise StoreError(f"pipe {pipe} is outside 0..{self.n_pipes - 1}")
        return self.group[f"pipe{pipe + 1}"]

    # -- tiles -----------------------------------------------------------------------------------
    def _array(self, pipe: int, name: str) -> zarr.Array:
        key = (pipe, name)
        if key not in self._arrays:
            self._arrays[key] = self._pipe(pipe)[name].with_config({"write_empty_chunks": True})
        return self._arrays[key]

    def tiles(self, pipe: int) -> zarr.Array:
        """The pipe's float32 tile array ``[d_out_pad, d_in_pad]`` (one chunk per tile)."""
        return self._array(pipe, "tiles")

    def write_band(self, pipe: int, row: int, band: np.ndarray) -> None:
        """Write output band ``row`` of a pipe: ``band`` is ``[tile_out, d_in_pad]`` (all its tiles;
        those wholly in the grid's padding are not stored and read as zeros: :meth:`band_chunks`)."""
        g = self.grids[pipe]
        if band.shape != (g.tile_out, g.d_in_pad):
            raise DataError(f"band must be {(g.tile_out, g.d_in_pad)}, got {band.shape}")
        self.write_bands(pipe, row, row + 1, band)

    def write_bands(self, pipe: int, r0: int, r1: int, bands: np.ndarray) -> None:
        """Bands ``r0:r1`` of a pipe from ``bands [(r1 - r0)·tile_out, ≥ live columns]`` (as :meth:`write_band`)."""
        g = self.grids[pipe]
        (rows, cols), a = g.live_shape, g.tile_out
        if min(r1 * a, rows) > r0 * a:
            self.tiles(pipe)[r0 * a:min(r1 * a, rows), :cols] = np.asarray(bands[: min(r1 * a, rows) - r0 * a, :cols],
                                                                           np.float32)

    def band_chunks(self, pipe: int, row: int) -> list[tuple[zarr.Array, tuple[int, int]]]:
        """The ``(array, chunk coordinates)`` that writing band ``row`` of a pipe stores: one per tile
        not wholly in padding (none for a band of padding rows only)."""
        g = self.grids[pipe]
        rows, cols = g.live_shape
        return [] if row * g.tile_out >= rows else [(self.tiles(pipe), (row, c)) for c in range(cols // g.tile_in)]

    def write_tile(self, pipe: int, worker: int, tile: np.ndarray) -> None:
        """Write one tile ``[tile_out, tile_in]``."""
        g = self.grids[pipe]
        if tile.shape != g.tile_shape:
            raise DataError(f"tile must be {g.tile_shape}, got {tile.shape}")
        self.tiles(pipe)[g.tile_region(worker)] = np.asarray(tile, np.float32)

    def read_tile(self, pipe: int, worker: int) -> np.ndarray:
        """Tile ``worker`` of ``pipe`` as float32 ``[tile_out, tile_in]``.

        Every chunk is checked against the store's chunk record (a missing, truncated or swapped
        chunk raises :class:`CorruptStoreError`, never zeros), and so are NaN/Inf values."""
        g = self.grids[pipe]
        what = f"tile {worker} of pipe {pipe + 1} in {self.url}"
        with reading(what):
            return finite(self.tiles(pipe)[g.tile_region(worker)], what)

    def read_band(self, pipe: int, row: int) -> np.ndarray:
        """Output band ``row`` of a pipe, ``[tile_out, d_in_pad]`` (checked as :meth:`read_tile`); a band
        grid stores its true rows only, so its last band may be shorter."""
        g = self.grids[pipe]
        what = f"band {row} of pipe {pipe + 1} in {self.url}"
        with reading(what):
            return finite(self.tiles(pipe)[row * g.tile_out:(row + 1) * g.tile_out, :], what)

    def dense(self, pipe: int) -> np.ndarray:
        """The pipe's tiles assembled into ``[d_out, d_in]`` (small adapters, tests, baselines)."""
        what = f"tiles of pipe {pipe + 1} in {self.url}"
        with reading(what):
            return finite(self.tiles(pipe)[: self.d_out, : self.d_in], what)

    # -- INT8 tiles ------------------------------------------------------------------------------
    @property
    def has_int8(self) -> bool:
        """True when every pipe has INT8 tiles and scales."""
        return all("tiles_int8" in self._pipe(p) and "scales" in self._pipe(p) for p in range(self.n_pipes))

    def int8_arrays(self, pipe: int, *, create: bool = False) -> tuple[zarr.Array, zarr.Array]:
        """``(tiles_int8, scales)`` of a pipe, created on request."""
        pg, g = self._pipe(pipe), self.grids[pipe]
        if "tiles_int8" not in pg or "scales" not in pg:
            if not create:
                raise StoreError(f"adapter {self.url} has no INT8 tiles: run `prismoe quantize` first")
            if "tiles_int8" not in pg:
                create_chunked(pg, "tiles_int8", _stored_shape(g), g.tile_shape, "int8", self.options)
            if "scales" not in pg:
                create_chunked(pg, "scales", (_stored_shape(g)[0], g.cols), (g.tile_out, 1), "float32", self.options)
        return self._array(pipe, "tiles_int8"), self._array(pipe, "scales")

    def damaged_int8_tiles(self, pipe: int, workers: Sequence[int]) -> list[int]:
        """Of ``workers`` (tiles recorded as quantized), those whose INT8 tile or scales chunk is
        missing or does not match its chunk record (all of them when the INT8 arrays are gone)."""
        workers = list(workers)
        if not workers:
            return []
        pg, g = self._pipe(pipe), self.grids[pipe]
        if "tiles_int8" not in pg or "scales" not in pg:
            return workers
        qa, sa = self.int8_arrays(pipe)
        coords = {j: g.row_col(j) for j in workers}
        bad = set(damaged_chunks(qa, coords.values())) | set(damaged_chunks(sa, coords.values()))
        return [j for j, c in coords.items() if c in bad]

    def write_tile_int8(self, pipe: int, worker: int, q: np.ndarray, scales: np.ndarray) -> None:
        """Write an INT8 tile ``[tile_out, tile_in]`` and its per-row scales ``[tile_out]``."""
        g = self.grids[pipe]
        qa, sa = self.int8_arrays(pipe, create=True)
        rows, _ = g.tile_region(worker)
        c = g.row_col(worker)[1]
        qa[g.tile_region(worker)] = np.asarray(q, np.int8)
        sa[rows, c] = np.asarray(scales, np.float32).reshape(-1)

    def read_tile_int8(self, pipe: int, worker: int) -> tuple[np.ndarray, np.ndarray]:
        """``(q int8 [tile_out, tile_in], scales float32 [tile_out])`` of one tile."""
        g = self.grids[pipe]
        qa, sa = self.int8_arrays(pipe)
        rows, _ = g.tile_region(worker)
        c = g.row_col(worker)[1]
        what = f"INT8 tile {worker} of pipe {pipe + 1} in {self.url}"
        with reading(what):
            return qa[g.tile_region(worker)], finite(sa[rows, c], what)

    # -- gates -----------------------------------------------------------------------------------
    def write_gate(self, pipe: int, weight: np.ndarray, bias: np.ndarray) -> None:
        """Write a pipe's gate: ``weight [workers, d_in]``, ``bias [workers]`` (float32)."""
        g = self.grids[pipe]
        weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        if weight.shape != (g.workers, self.d_in) or bias.shape != (g.workers,):
            raise DataError(f"gate must be [{g.workers}, {self.d_in}] and [{g.workers}], "
                            f"got {weight.shape}, {bias.shape}")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise DataError(f"the gate of pipe {pipe + 1} holds NaN or Inf: refusing to store it "
                            "(the stored gate is kept)")
        pg = self._pipe(pipe)
        for name, data in (("gate_weight", weight), ("gate_bias", bias)):
            if name not in pg:
                create_chunked(pg, name, data.shape, data.shape, "float32", self.options)
            pg[name][...] = data

    def read_gate(self, pipe: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(weight [workers, d_in], bias [workers])`` of a pipe, or ``None`` before gate training.

        Raises :class:`~prismoe_store.errors.CorruptStoreError` for a damaged gate, and for a missing
        one when the ``gates`` record says training finished (every pipe of a fitted adapter then has
        its gate; a head adapter's band gate is :meth:`read_band_gate`'s); the message names the pipe
        as its folder does (``pipe=1`` is "pipe 2") and the command that repairs it."""
        pg = self._pipe(pipe)
        present = [name in pg for name in ("gate_weight", "gate_bias")]
        if not all(present):
            record = self.group.attrs.get("gates")
            if any(present) or (self.layout != "partition" and isinstance(record, dict)  # not a head's
                                and record.get("complete")):
                why = ("damaged, or its first write was cut short" if any(present)
                       else "whose gate training is recorded as finished")
                raise CorruptStoreError(f"the gate of pipe {pipe + 1} ({'half ' if any(present) else ''}missing) in "
                                        f"{self.url}, {why}: {RETRAIN_GATES}")
            return None
        what = f"gate of pipe {pipe + 1} in {self.url}"
        with reading(what, advice=RETRAIN_GATES):
            return (finite(self._array(pipe, "gate_weight")[...], what),
                    finite(self._array(pipe, "gate_bias")[...], what))

    @contextmanager
    def keeping_gates(self) -> Iterator[None]:
        """Run a gate-training job so that, if it fails with a library error (divergence, damaged or
        NaN input: a :class:`~prismoe_store.errors.PrismoeError`), the gates and their ``gates``
        attribute are put back as they were (a failed ``fit-gates --restart`` never leaves a worse
        store). Other exceptions (an interrupt) keep the saved progress so a re-run resumes.

        >>> from prismoe_store.grid import plan_grid
        >>> a = AdapterStore.create("memory://doc-keep", grids=[plan_grid(4, 4, 2)], overwrite=True)
        >>> a.write_gate(0, np.ones((2, 4)), np.zeros(2))
        >>> try:
        ...     with a.keeping_gates():
        ...         a.write_gate(0, np.zeros((2, 4)), np.zeros(2)); raise DataError("diverged")
        ... except DataError:
        ...     pass
        >>> float(a.read_gate(0)[0].sum())
        8.0
        """
        saved: list = []  # per pipe: its gate, None when it has none, or _UNREADABLE
        for p in range(self.n_pipes):
            try:
                saved.append(self.read_gate(p))
            except StoreError:
                saved.append(_UNREADABLE)  # damaged: left as it is, for later reads to refuse
        attr = self.group.attrs.get("gates")
        try:
            yield
        except PrismoeError:
            for p, gate in enumerate(saved):
                if gate is _UNREADABLE:
                    continue
                if gate is not None:
                    self.write_gate(p, *gate)
                else:
                    for name in ("gate_weight", "gate_bias"):
                        if name in self._pipe(p):
                            del self._pipe(p)[name]
                    self._arrays = {k: v for k, v in self._arrays.items() if k[0] != p or "gate" not in k[1]}
            if attr is not None:
                self.group.attrs["gates"] = attr
            elif "gates" in self.group.attrs:
                del self.group.attrs["gates"]
            raise


_UNREADABLE = object()  # keeping_gates: a gate that could not be read before the job


def _stored_shape(g: GridSpec) -> tuple[int, int]:
    """A band grid stores only its true rows and columns; other grids store their padded shape."""
    return (g.d_out, g.d_in) if g.is_band_grid else g.padded_shape


def _check_alphas(alphas: Sequence[float] | None, n: int) -> list[float]:
    if alphas is None:
        return [1.0 / n] * n
    alphas = [float(a) for a in alphas]
    if len(alphas) != n or any(a < 0 or not np.isfinite(a) for a in alphas) or abs(sum(alphas) - 1.0) > 1e-6:
        raise DataError(f"alphas must be {n} non-negative numbers summing to 1, got {alphas}")
    return alphas
