"""What the runtime reads an adapter through: the :class:`TileSource` protocol and its wrappers.

The runtime never touches Zarr: it reads shapes, grids, tiles and gates through a *tile source*.
An :class:`~prismoe_store.stores.adapter.AdapterStore` is one (structurally: it has every member);
:class:`TileSourceWrapper` forwards every member to a wrapped source, and its subclasses override
only what they change:

- :class:`HostTiles` serves an adapter's tiles from host RAM (each pipe's arrays read once);
- :class:`UniformGate` hides the gates, so the runtime routes with a uniform gate (at ρ = 1 it
  then computes the adapter's dense matrix, :func:`~prismoe_store.runtime.dense.dense_matrix`).

A head adapter (``layout = "partition"``) is read through the wider :class:`BandSource`: its
bands, row order and band gate. Shapes and dtypes of every member are on the protocols below
(``a, b = grid.tile_shape``: tile rows and columns; ``W = grid.workers``; ``n`` bands).

>>> import numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores.adapter import AdapterStore
>>> a = AdapterStore.create("memory://doc-tile-source", grids=[plan_grid(6, 10, 8)], overwrite=True)
>>> a.write_gate(0, np.ones((8, 6), np.float32), np.zeros(8, np.float32))
>>> isinstance(a, TileSource), UniformGate(a).read_gate(0), a.read_gate(0)[0].shape
(True, None, (8, 6))
"""

from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

import numpy as np

from prismoe_store.errors import IncompleteStoreError
from prismoe_store.grid import GridSpec
from prismoe_store.stores.verified import reading


@runtime_checkable
class TileSource(Protocol):
    """What the runtime needs from an adapter: its shape, grids, weights, tiles, gates and records."""

    @property
    def d_in(self) -> int: ...  # input width M

    @property
    def d_out(self) -> int: ...  # output width N

    @property
    def layout(self) -> str: ...  # "ensemble" (fitted: every pipe estimates all of z) or "partition" (head)

    @property
    def mode(self) -> str: ...  # "joint" or "independent": how the gate weights combine a band's tiles

    @property
    def alphas(self) -> list[float]: ...  # pipe weights α_p, one per pipe, summing to 1

    @property
    def grids(self) -> list[GridSpec]: ...  # one grid per pipe, all over d_in → d_out (partition: split rows)

    def attrs(self) -> dict: ...  # the adapter's records (fit settings, metrics, "gates": {"settings": ...})

    def read_tile(self, pipe: int, worker: int) -> np.ndarray: ...  # float32 [a, b]

    def read_tile_int8(self, pipe: int, worker: int) -> tuple[np.ndarray, np.ndarray]: ...  # int8 [a, b], float32 [a]

    def read_gate(self, pipe: int) -> tuple[np.ndarray, np.ndarray] | None: ...  # float32 [W, M], [W]; None: no gate


@runtime_checkable
class BandSource(TileSource, Protocol):
    """A head adapter (``partition`` layout): what :class:`~prismoe_store.runtime.bands.SelectRuntime` reads."""

    @property
    def band_rows(self) -> int: ...  # rows a of a band (the last band may hold fewer)

    @property
    def n_bands(self) -> int: ...  # bands n, all pipes together

    def read_band_tiles(self, band: int) -> np.ndarray: ...  # float32 [rows ≤ a, M], true rows only

    def read_band_int8(self, band: int) -> tuple[np.ndarray, np.ndarray]: ...  # int8 [rows, M], float32 [rows]

    def read_order(self) -> np.ndarray: ...  # int64 [N]: adapter row → token id (a permutation)

    def read_band_gate(self) -> tuple[np.ndarray, np.ndarray] | None: ...  # float32 [n, M], [n]


class TileSourceWrapper:
    """A tile source that forwards every member of :class:`TileSource` and :class:`BandSource` to
    ``inner``; subclasses override what they change (band members raise what ``inner`` raises when
    it is not a head adapter).

    >>> from prismoe_store.grid import plan_grid
    >>> from prismoe_store.stores.adapter import AdapterStore
    >>> a = AdapterStore.create("memory://doc-wrapper", grids=[plan_grid(4, 4, 4)], overwrite=True)
    >>> w = TileSourceWrapper(a)
    >>> (w.d_in, w.d_out, w.mode, w.layout), w.read_tile(0, 0).shape
    ((4, 4, 'joint', 'ensemble'), (2, 2))
    """

    def __init__(self, inner: TileSource):
        self.inner = inner  # the wrapped source

    # -- TileSource --------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.inner.d_in)

    @property
    def d_out(self) -> int:
        return int(self.inner.d_out)

    @property
    def layout(self) -> str:
        return self.inner.layout

    @property
    def mode(self) -> str:
        return self.inner.mode

    @property
    def alphas(self) -> list[float]:
        return list(self.inner.alphas)

    @property
    def grids(self) -> list[GridSpec]:
        return list(self.inner.grids)

    def attrs(self) -> dict:
        return self.inner.attrs()

    def read_tile(self, pipe: int, worker: int) -> np.ndarray:
        return self.inner.read_tile(pipe, worker)

    def read_tile_int8(self, pipe: int, worker: int) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.read_tile_int8(pipe, worker)

    def read_gate(self, pipe: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self.inner.read_gate(pipe)

    # -- BandSource --------------------------------------------------------------------------------
    @property
    def _bands(self) -> BandSource:
        # only called on head adapters; on another source the member lookup fails there, as it would here
        return cast(BandSource, self.inner)

    @property
    def band_rows(self) -> int:
        return int(self._bands.band_rows)

    @property
    def n_bands(self) -> int:
        return int(self._bands.n_bands)

    def read_band_tiles(self, band: int) -> np.ndarray:
        return self._bands.read_band_tiles(band)

    def read_band_int8(self, band: int) -> tuple[np.ndarray, np.ndarray]:
        return self._bands.read_band_int8(band)

    def read_order(self) -> np.ndarray:
        return self._bands.read_order()

    def read_band_gate(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._bands.read_band_gate()


class UniformGate(TileSourceWrapper):
    """``inner`` behind a uniform gate: no gate is read and no gate settings are recorded, so the
    runtime gives every live tile the same score (at ρ = 1: the dense matrix, any sparsity the
    caller asks for otherwise).

    >>> from prismoe_store.grid import plan_grid
    >>> from prismoe_store.stores.adapter import AdapterStore
    >>> a = AdapterStore.create("memory://doc-uniform", grids=[plan_grid(4, 4, 4)], overwrite=True,
    ...                         attrs={"gates": {"settings": {"sparsity": 0.5}}})
    >>> "gates" in UniformGate(a).attrs(), UniformGate(a).read_gate(0)
    (False, None)
    """

    def attrs(self) -> dict:
        return {k: v for k, v in self.inner.attrs().items() if k != "gates"}

    def read_gate(self, pipe: int) -> None:
        return None


class HostTiles(TileSourceWrapper):
    """An adapter store's tiles served from host RAM: each pipe's float32 tiles (and, with
    ``int8=True``, its INT8 tiles and scales) read from the store once, gates read through.

    ``adapter`` is an :class:`~prismoe_store.stores.adapter.AdapterStore` (the whole arrays are read,
    every chunk verified); :meth:`read_tile_int8` raises :class:`IncompleteStoreError` when the
    INT8 tiles were not loaded.

    >>> import numpy as np
    >>> from prismoe_store.grid import plan_grid
    >>> from prismoe_store.stores.adapter import AdapterStore
    >>> a = AdapterStore.create("memory://doc-host-tiles", grids=[plan_grid(4, 4, 4)], overwrite=True)
    >>> a.write_tile(0, 3, np.full((2, 2), 7, np.float32))
    >>> HostTiles(a, int8=False).read_tile(0, 3).tolist()
    [[7.0, 7.0], [7.0, 7.0]]
    """

    def __init__(self, adapter, *, int8: bool):
        super().__init__(adapter)
        pipes = range(len(adapter.grids))
        with reading(f"tiles of {adapter.url}"):
            self.fp32 = [np.asarray(adapter.tiles(p)[...]) for p in pipes]  # per pipe: float32 [N_pad, M_pad]
            self.int8 = ([tuple(np.asarray(a[...]) for a in adapter.int8_arrays(p)) for p in pipes]
                         if int8 else None)  # per pipe: (int8 [N_pad, M_pad], float32 scales [N_pad, C])

    def read_tile(self, pipe: int, worker: int) -> np.ndarray:
        rows, cols = self.grids[pipe].tile_region(worker)
        return np.ascontiguousarray(self.fp32[pipe][rows, cols])

    def read_tile_int8(self, pipe: int, worker: int) -> tuple[np.ndarray, np.ndarray]:
        if self.int8 is None:
            raise IncompleteStoreError("no INT8 tiles were loaded into host RAM")
        g = self.grids[pipe]
        rows, cols = g.tile_region(worker)
        q, s = self.int8[pipe]
        return np.ascontiguousarray(q[rows, cols]), np.ascontiguousarray(s[rows, g.row_col(worker)[1]])
