"""The pairs store: activation pairs ``x [S, d_in]`` and ``z [S, d_out]`` for fitting an adapter.

Rows are chunked in blocks of ``rows_per_chunk`` and columns in widths that divide the tile
grids' input slices and output bands, so a fit can stream one column slice or one output band
without reading the rest. The arrays may be longer than the data: the committed row count is the
``rows`` attribute, written *after* the rows themselves, so an interrupted or concurrent append
never shows ``x`` and ``z`` with different row counts to a reader.

>>> import numpy as np
>>> from prismoe_store.stores.pairs import PairsStore
>>> p = PairsStore.create("memory://doc-pairs", d_in=6, d_out=4, overwrite=True)
>>> p.append(np.ones((5, 6), np.float32), np.zeros((5, 4), np.float32))
5
>>> p.rows, PairsStore.open("memory://doc-pairs").read(0, 2)[0].shape
(5, (2, 6))
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import zarr

from prismoe_store.errors import DataError, StoreError
from prismoe_store.grid import plan_pipes
from prismoe_store.stores.formats import StoreOptions, create_checked, create_chunked, open_checked
from prismoe_store.stores.verified import damaged_chunks, reading

PAIRS_FORMAT, PAIRS_VERSION = "pairs", 1
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_WRITE_ALL = {"write_empty_chunks": True}  # runtime config (not persisted): a missing chunk means damage
_SPLIT_BLOCK = 65536  # rows per block of the seeded row-split stream (fixed: part of the format)
# the encoding of a new pairs store unless told otherwise: crc32c only. Activations are noisy float32
# (zstd saves ~7% on SmolLM2 hidden states) and zstd decodes 3-4× slower, which a fit pays per row
PAIRS_OPTIONS = StoreOptions(compressor="none")


def default_col_chunks(d_in: int, d_out: int, workers: int = 512) -> tuple[int, int]:
    """Column chunk widths for ``x`` and ``z``: the narrowest tile slice/band of the default pipes,
    but at least 64 columns (or the whole width when smaller).

    >>> default_col_chunks(4096, 128256)
    (128, 512)
    """
    grids = plan_pipes(d_in, d_out, workers)
    cin = max(64, min(g.tile_in for g in grids))
    cout = max(64, min(g.tile_out for g in grids))
    return min(cin, d_in), min(cout, d_out)


class PairsStore:
    """A Zarr v3 store of activation pairs; see the module docstring for the layout."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group  # the root Zarr group
        self.url = url  # where the store lives

    # -- create / open -------------------------------------------------------------------------
    @classmethod
    def create(cls, url, *, d_in: int, d_out: int, rows_per_chunk: int = 2048,
               col_chunks: tuple[int, int] | None = None, options: StoreOptions | None = None,
               provenance: dict | None = None, overwrite: bool = False) -> PairsStore:
        """Create an empty pairs store for ``d_in → d_out`` pairs (float32); ``options`` default to
        :data:`PAIRS_OPTIONS` (no compressor, crc32c checksums).

        >>> PairsStore.create("memory://doc-pairs-c", d_in=8, d_out=3, overwrite=True).rows
        0
        """
        for name, v in (("d_in", d_in), ("d_out", d_out), ("rows_per_chunk", rows_per_chunk)):
            if not isinstance(v, int) or v < (0 if name == "d_out" else 1):
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        options = options or PAIRS_OPTIONS
        cin, cout = col_chunks or default_col_chunks(d_in, max(d_out, 1))
        group = create_checked(url, PAIRS_FORMAT, PAIRS_VERSION, overwrite=overwrite,
                               storage_options=options.storage_options,
                               attrs={"d_in": d_in, "d_out": d_out, "rows": 0, "rows_per_chunk": rows_per_chunk,
                                      "provenance": provenance or {}})
        create_chunked(group, "x", (0, d_in), (rows_per_chunk, cin), "float32", options)
        if d_out:  # d_out = 0: hidden states only (to train a head adapter's gate), no z array
            create_chunked(group, "z", (0, d_out), (rows_per_chunk, cout), "float32", options)
        return cls(group, str(url))

    @classmethod
    def open(cls, url, mode: str = "r", *, storage_options: dict | None = None) -> PairsStore:
        """Open an existing pairs store (format and version checked)."""
        group = open_checked(url, PAIRS_FORMAT, PAIRS_VERSION, mode, storage_options=storage_options)
        return cls(group, str(url))

    # -- shape -----------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        """Width of ``x``."""
        return int(self.group.attrs["d_in"])

    @property
    def d_out(self) -> int:
        """Width of ``z``."""
        return int(self.group.attrs["d_out"])

    @property
    def rows(self) -> int:
        """Committed rows (what readers see)."""
        return int(self._attrs()["rows"])

    @property
    def rows_per_chunk(self) -> int:
        """Rows per chunk of ``x`` and ``z``."""
        return int(self.group.attrs["rows_per_chunk"])

    @property
    def provenance(self) -> dict:
        """Where the pairs came from (models, layer, target, texts, generator settings, ...)."""
        return dict(self._attrs().get("provenance", {}))

    def _attrs(self) -> dict:
        # re-read: another process or another PairsStore object may have appended since we opened
        # (Zarr caches a group's metadata when it opens it, writers included)
        return dict(zarr.open_group(self.group.store, path=self.group.path, mode="r").attrs)

    @property
    def x(self) -> zarr.Array:
        """The raw ``x`` array (may hold uncommitted rows past :attr:`rows`)."""
        return self.group["x"].with_config(_WRITE_ALL)

    @property
    def hidden_only(self) -> bool:
        """True for a store of hidden states only (``d_out = 0``, no ``z``)."""
        return self.d_out == 0

    @property
    def z(self) -> zarr.Array:
        """The raw ``z`` array (may hold uncommitted rows past :attr:`rows`)."""
        if self.hidden_only:
            raise DataError(f"{self.url} holds hidden states only (no z): it trains head gates, not fits")
        return self.group["z"].with_config(_WRITE_ALL)

    # -- writing ---------------------------------------------------------------------------------
    def append(self, x: np.ndarray, z: np.ndarray, *, provenance: dict | None = None) -> int:
        """Append rows; returns the new committed row count.

        Rows are written first and the count last, under a lock, so readers never see a torn append.
        ``provenance`` entries, if given, are merged into the store's provenance in the same commit.
        """
        x = np.asarray(x, dtype=np.float32)
        z = np.asarray(z, dtype=np.float32)
        if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
            raise DataError(f"append needs x [n, {self.d_in}] and z [n, {self.d_out}], got {x.shape} and {z.shape}")
        if x.shape[1] != self.d_in or z.shape[1] != self.d_out:
            raise DataError(f"width mismatch: store holds {self.d_in}→{self.d_out}, got {x.shape[1]}→{z.shape[1]}")
        with self._lock():
            n, k = self.rows, x.shape[0]
            for arr, data in ((self.x, x), *(() if self.hidden_only else ((self.z, z),))):
                if arr.shape[0] < n + k:
                    arr.resize((n + k, arr.shape[1]))
                arr[n:n + k] = data
            update = {"rows": n + k}
            if provenance:
                update["provenance"] = {**self.provenance, **provenance}
            self.group.attrs.update(update)
            return n + k

    def set_provenance(self, **entries) -> None:
        """Merge entries into the provenance record."""
        with self._lock():
            self.group.attrs["provenance"] = {**self.provenance, **entries}

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """A lock file for local stores (across processes), an in-process lock otherwise.

        Once held, the group's metadata is re-read, so the attributes this writer updates start
        from what the previous writer committed, not from what Zarr cached when we opened.
        """
        with _LOCKS_GUARD:
            tlock = _LOCKS.setdefault(self.url, threading.Lock())
        with tlock:
            if "://" in self.url:
                self._reload()
                yield
                return
            with open(os.path.join(self.url, ".append.lock"), "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    self._reload()
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _reload(self) -> None:
        self.group = zarr.open_group(self.group.store, path=self.group.path,
                                     mode="r" if self.group.read_only else "r+")

    def damaged_rows(self) -> list[tuple[int, int]]:
        """Committed row ranges ``(start, stop)``, one per row chunk, where a chunk of ``x`` or ``z``
        is missing, unrecorded or does not match its record (reads every committed chunk once).

        A resuming writer calls this before appending: ``synth`` writes those rows again, ``collect``
        (which cannot recreate rows in place) refuses to extend a damaged store.

        >>> PairsStore.open("memory://doc-pairs").damaged_rows()
        []
        """
        n, rpc = self.rows, self.rows_per_chunk
        bad: set[int] = set()
        for arr in (self.x, *(() if self.hidden_only else (self.z,))):
            col_chunks = -(-arr.shape[1] // arr.chunks[1])
            coords = [(i, j) for i in range(-(-n // rpc)) for j in range(col_chunks)]
            bad.update(i for i, _ in damaged_chunks(arr, coords))
        return [(i * rpc, min(n, (i + 1) * rpc)) for i in sorted(bad)]

    def rewrite(self, start: int, x: np.ndarray, z: np.ndarray) -> None:
        """Write committed rows ``start:start + len(x)`` again (repairing damaged chunks with rows a
        deterministic generator made again); the row count does not change."""
        x = np.asarray(x, dtype=np.float32)
        z = np.asarray(z, dtype=np.float32)
        stop = start + x.shape[0]
        if not 0 <= start <= stop <= self.rows or x.shape[1:] != (self.d_in,) or \
                z.shape != (x.shape[0], self.d_out):
            raise DataError(f"rewrite needs committed rows and x [n, {self.d_in}], z [n, {self.d_out}]; got rows "
                            f"{start}:{stop} of {self.rows}, {x.shape} and {z.shape}")
        with self._lock():
            self.x[start:stop] = x
            if not self.hidden_only:
                self.z[start:stop] = z

    # -- reading ---------------------------------------------------------------------------------
    def read(self, start: int, stop: int, *, cols_x: slice = slice(None), cols_z: slice = slice(None)
             ) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop`` (clipped to the committed rows) of ``x`` and ``z``, optionally a column range."""
        stop = min(stop, self.rows)
        start = min(start, stop)
        with reading(f"pairs in {self.url}"):
            x = self.x[start:stop, cols_x]
            return x, (np.zeros((len(x), 0), np.float32) if self.hidden_only else self.z[start:stop, cols_z])

    def read_x(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (clipped to the committed rows) of ``x`` only.

        >>> h = PairsStore.create("memory://doc-hidden", d_in=3, d_out=0, overwrite=True)
        >>> h.append(np.ones((2, 3), np.float32), np.zeros((2, 0), np.float32))
        2
        >>> h.hidden_only, h.read_x(0, 5).shape
        (True, (2, 3))
        """
        stop = min(stop, self.rows)
        with reading(f"hidden states in {self.url}"):
            return self.x[min(start, stop):stop]

    def dask(self, *, row_chunk: int | None = None):
        """``(x, z)`` as Dask arrays over the committed rows, chunked ``(row_chunk, full width)``.

        >>> p = PairsStore.open("memory://doc-pairs")
        >>> p.dask()[0].shape
        (5, 6)
        """
        import dask.array as da

        n, rc = self.rows, row_chunk or self.rows_per_chunk
        x = da.from_zarr(self.x, chunks=(rc, self.d_in))[:n]
        z = da.from_zarr(self.z, chunks=(rc, self.d_out))[:n]
        return x, z

    def iter_rows(self, batch: int, *, start: int = 0, stop: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(offset, x, z)`` blocks of at most ``batch`` rows, in order."""
        stop = self.rows if stop is None else min(stop, self.rows)
        for s in range(start, stop, batch):
            x, z = self.read(s, min(s + batch, stop))
            yield s, x, z


def _is_npy(source) -> bool:
    """Whether ``source`` names a ``.npy`` file (or any file) rather than a pairs store."""
    return isinstance(source, (str, os.PathLike)) and (str(source).endswith(".npy") or os.path.isfile(source))


def open_rows(source, d: int | None = None, max_rows: int | None = None
              ) -> tuple[Callable[[int, int], np.ndarray], int]:
    """``(read(start, stop) -> float32 [n, d], rows)`` over input rows (hidden states): a pairs store's
    ``x`` (a :class:`PairsStore`, or its path/URL) or a ``.npy`` file (memory-mapped, copied per read).

    With ``d`` the width is checked; ``max_rows`` caps the rows; every read refuses NaN/Inf with the
    row named (:class:`DataError`).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npy"); np.save(path, np.ones((5, 3), np.float32))
    >>> read, n = open_rows(path, 3, max_rows=4)
    >>> n, read(0, 2).shape
    (4, (2, 3))
    """
    if _is_npy(source):
        if not os.path.isfile(source):
            raise DataError(f"no such file: {source}")
        try:
            arr = np.load(source, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {source} as a .npy array: {e}") from None
        if arr.ndim != 2:
            raise DataError(f"{source} must hold a 2-D array [rows, width], got shape {arr.shape}")
        S, width = arr.shape
        read = lambda a, b: np.array(arr[a:b], np.float32)  # noqa: E731  (a writable copy)
    else:
        store = source if isinstance(source, PairsStore) else PairsStore.open(source)
        S, width = store.rows, store.d_in
        read = store.read_x
    if d is not None and width != d:
        raise DataError(f"input rows are {width} wide but {d} are expected (the adapter's d_in)")
    if S < 1:
        raise DataError(f"{source} holds no rows")
    S = min(S, max_rows or S)

    def checked(a: int, b: int) -> np.ndarray:
        x = read(a, b)
        if not np.isfinite(x).all():
            bad = a + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise DataError(f"input row {bad} holds NaN or Inf")
        return x

    return checked, S


def row_uniform(seed: int, start: int, stop: int) -> np.ndarray:
    """Deterministic uniforms in [0, 1) for rows ``start:stop``, the same however rows are chunked.

    Row splits (held-out rows, pipe 2's subsample) compare these with a fraction, so any reader
    that knows the seed recomputes the same split for any block of rows.

    >>> import numpy as np
    >>> bool(np.array_equal(row_uniform(7, 3, 9), row_uniform(7, 0, 20)[3:9]))
    True
    """
    out = np.empty(max(0, stop - start), dtype=np.float64)
    pos = start
    while pos < stop:
        block = pos // _SPLIT_BLOCK
        u = np.random.default_rng([int(seed), block]).random(_SPLIT_BLOCK)
        lo = pos - block * _SPLIT_BLOCK
        hi = min(_SPLIT_BLOCK, stop - block * _SPLIT_BLOCK)
        out[pos - start:pos - start + hi - lo] = u[lo:hi]
        pos += hi - lo
    return out


def holdout_mask(seed: int, start: int, stop: int, fraction: float) -> np.ndarray:
    """True for held-out rows among ``start:stop`` (a seeded share ``fraction`` of all rows).

    >>> round(float(holdout_mask(0, 0, 100_000, 0.1).mean()), 2)
    0.1
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    return row_uniform(seed, start, stop) < fraction


NONFINITE_CHOICES = ("error", "drop", "zero")  # what screen_nonfinite does with NaN/Inf rows


def screen_nonfinite(x: np.ndarray, z: np.ndarray, on_nonfinite: str = "error", *, where: str = ""
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """Find pairs whose ``x`` or ``z`` row holds NaN/Inf (after the float32 cast the store makes)
    and handle them: ``"error"`` raises :class:`DataError` naming the count, ``"drop"`` removes
    those rows, ``"zero"`` sets them to zero in both arrays (the row count, and so any alignment
    with tokens, is kept; an all-zero pair adds nothing to the fit's statistics).
    Returns ``(x, z, bad_rows)`` as float32, ready for :meth:`PairsStore.append`; ``where``
    (e.g. a file name) goes into the error message.

    >>> x = np.array([[1.0, np.nan], [2.0, 3.0], [1e39, 0.0]])
    >>> z = np.ones((3, 1))
    >>> xs, zs, bad = screen_nonfinite(x, z, "drop")
    >>> bad, xs.tolist()
    (2, [[2.0, 3.0]])
    """
    if on_nonfinite not in NONFINITE_CHOICES:
        raise DataError(f"on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, got {on_nonfinite!r}")
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, and count as bad
        x = np.asarray(x, dtype=np.float32)
        z = np.asarray(z, dtype=np.float32)
    if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
        raise DataError(f"pairs need x [n, d_in] and z [n, d_out] with the same n, got {x.shape} and {z.shape}")
    bad = ~(np.isfinite(x).all(axis=1) & np.isfinite(z).all(axis=1))
    count = int(bad.sum())
    if count == 0:
        return x, z, 0
    if on_nonfinite == "error":
        raise DataError(f"{count} of {x.shape[0]} pairs{' from ' + where if where else ''} hold NaN/Inf "
                        "(choose --on-nonfinite drop or zero to keep going)")
    if on_nonfinite == "drop":
        return x[~bad], z[~bad], count
    x, z = x.copy(), z.copy()  # never write into the caller's arrays
    x[bad] = 0.0
    z[bad] = 0.0
    return x, z, count


def collected_layer(source) -> tuple[int, int] | None:
    """``(layer, layers)``: the model layer a collected pairs store's ``x`` came from and the model's
    layer count, from its provenance; ``None`` for a ``.npy``, a store that does not say, or
    nothing readable there (the command's own reading names what is wrong).

    >>> s = PairsStore.create("memory://doc-layer", d_in=4, d_out=0, overwrite=True, provenance={
    ...     "kind": "collected", "settings": {"layer": 12, "upper_model": {"num_hidden_layers": 30}}})
    >>> collected_layer(s)
    (12, 30)
    """
    if _is_npy(source):
        return None
    try:
        store = source if isinstance(source, PairsStore) else PairsStore.open(source)
    except StoreError:
        return None
    settings = store.provenance.get("settings") or {}
    layer, layers = settings.get("layer"), (settings.get("upper_model") or {}).get("num_hidden_layers")
    return (layer, layers) if isinstance(layer, int) and isinstance(layers, int) else None


def head_input_note(source) -> str | None:
    """A one-line note when ``source`` holds hidden states collected from a layer other than the
    model's last (:func:`collected_layer`): a head (``lm_head``) reads the last layer's states, after
    the final norm, and its gate and quality figures mean little on another layer's.

    >>> s = PairsStore.create("memory://doc-note", d_in=4, d_out=0, overwrite=True, provenance={
    ...     "kind": "collected", "settings": {"layer": 12, "upper_model": {"num_hidden_layers": 30}}})
    >>> print(head_input_note(s).split("; ")[0])
    note: memory://doc-note holds hidden states of layer 12 of 30
    """
    got = collected_layer(source)
    if got is None or got[0] == got[1]:
        return None
    return (f"note: {getattr(source, 'url', source)} holds hidden states of layer {got[0]} of {got[1]}; a head "
            f"reads the last layer's ({got[1]}, `prismoe collect --layer -1`, the default)")


def fitted_input_note(source, fitted_on) -> str | None:
    """A one-line note when ``source``'s rows come from another model layer than the pairs an
    adapter was fitted on (``fitted_on``: their path/URL, from the adapter's fit record).

    >>> a = PairsStore.create("memory://doc-fit12", d_in=4, d_out=4, overwrite=True, provenance={
    ...     "kind": "collected", "settings": {"layer": 12, "upper_model": {"num_hidden_layers": 30}}})
    >>> fitted_input_note(a, a) is None
    True
    """
    got, want = collected_layer(source), collected_layer(fitted_on)
    if got is None or want is None or got == want:
        return None
    return (f"note: {getattr(source, 'url', source)} holds hidden states of layer {got[0]} of {got[1]}; the "
            f"adapter was fitted on layer {want[0]}'s ({getattr(fitted_on, 'url', fitted_on)})")
