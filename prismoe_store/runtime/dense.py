"""The dense matrix an adapter stands for: what its runtime computes at full density.

For a fitted adapter (``ensemble`` layout) with a uniform gate at ρ = 1 every live tile is
selected; ``joint`` tiles get weight 1 and ``independent`` tiles a band softmax over equal
scores, ``1/C_live`` each (``C_live``: the columns of tiles that touch the true input). So::

    W = Σ_p α_p s_p W_p,   s_p = 1 (joint) or 1 / C_live(p) (independent)

For a head adapter (``partition`` layout) it is the head's matrix with its rows back in token
order. Benchmarks use it as their dense baseline and the contract tests as the reference.

>>> import numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores.adapter import AdapterStore
>>> a = AdapterStore.create("memory://doc-dense", grids=[plan_grid(4, 4, 4)], mode="independent", overwrite=True)
>>> a.write_band(0, 0, np.ones((2, 4), np.float32))
>>> dense_matrix(a)[:2].tolist()  # each row band averages its two tiles
[[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]
"""

from __future__ import annotations

from typing import cast

import numpy as np

from prismoe_store.grid import GridSpec
from prismoe_store.runtime.quant import dequantize_tile
from prismoe_store.runtime.tile_source import BandSource, TileSource


def tile_scale(mode: str, grid: GridSpec) -> float:
    """The weight every live tile of ``grid`` gets at ρ = 1 under a uniform gate: 1 for ``joint``
    tiles, ``1/C_live`` for ``independent`` ones (a band averages its live tiles).

    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(6, 8, 8)
    >>> tile_scale("joint", g), tile_scale("independent", g) == 1 / -(-6 // g.tile_in)
    (1.0, True)
    """
    return 1.0 if mode == "joint" else 1.0 / -(-grid.d_in // grid.tile_in)


def dense_matrix(source: TileSource | BandSource) -> np.ndarray:
    """float32 ``[d_out, d_in]``: ``Σ_p α_p s_p W_p`` summed in float64 tile by tile over the live
    tiles (see the module docstring), or a head adapter's rows in token order (exact copies).
    Reads every live tile once; raises what the source raises for a damaged tile."""
    return DenseView(source)[:, :]


class DenseView:
    """The dense matrix of an adapter (see the module docstring) read lazily, block by block:
    ``view[r0:r1, c0:c1]`` is float32 ``[r1 - r0, c1 - c0]`` (steps of 1), built from the tiles that
    overlap the block only, so a caller streaming blocks never holds the whole matrix.

    With ``int8`` the INT8 tiles are read instead, dequantized as the runtime does (``q · scale``
    per row; :class:`~prismoe_store.errors.IncompleteStoreError` from the source when there are
    none). A fitted adapter's block reads the tiles it overlaps (each read again for every block it
    overlaps). A head adapter's rows are in token order, and the tokens of a block lie in many
    bands: bands read are kept, up to ``cache_bytes``, for the next blocks.

    >>> from prismoe_store.grid import plan_grid
    >>> from prismoe_store.stores.adapter import AdapterStore
    >>> a = AdapterStore.create("memory://doc-dense-view", grids=[plan_grid(4, 6, 4)], overwrite=True)
    >>> for r in range(2): a.write_band(0, r, np.arange(r * 16, r * 16 + 16, dtype=np.float32).reshape(4, 4))
    >>> view = DenseView(a)
    >>> view.shape, view[3:5, 1:3].tolist()
    ((6, 4), [[13.0, 14.0], [17.0, 18.0]])
    """

    def __init__(self, source: TileSource | BandSource, *, int8: bool = False, cache_bytes: int = 256 << 20):
        self.source = source  # the adapter
        self.int8 = int8  # read the INT8 tiles, dequantized (``q · scale`` per row), instead of the float32 ones
        self.shape = (int(source.d_out), int(source.d_in))  # (rows, columns) of the matrix
        self.cache_bytes = cache_bytes  # head adapters: most bytes of bands kept between blocks
        self._bands: dict[int, np.ndarray] = {}  # head adapters: band -> float32 [rows, d_in], oldest first
        self._place: np.ndarray | None = None  # head adapters: token id -> adapter row (read on first use)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        r0, r1, rs = rows.indices(self.shape[0])
        c0, c1, cs = cols.indices(self.shape[1])
        if rs != 1 or cs != 1:
            raise IndexError("a DenseView takes slices with a step of 1")
        r1, c1 = max(r0, r1), max(c0, c1)
        if self.source.layout == "partition":
            return self._head_block(cast(BandSource, self.source), r0, r1, c0, c1)
        return self._fitted_block(cast(TileSource, self.source), r0, r1, c0, c1)

    def _fitted_block(self, source: TileSource, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        w = np.zeros((r1 - r0, c1 - c0), np.float64)
        if r1 == r0 or c1 == c0:
            return w.astype(np.float32)
        for p, (alpha, g) in enumerate(zip(source.alphas, source.grids, strict=True)):
            weight = alpha * tile_scale(source.mode, g)
            for r in range(r0 // g.tile_out, -(-r1 // g.tile_out)):  # the bands and columns the block overlaps
                for c in range(c0 // g.tile_in, -(-c1 // g.tile_in)):
                    j = g.worker(r, c)
                    rows, cols = g.valid_region(j)
                    lo, hi = max(r0, rows.start), min(r1, rows.stop)
                    left, right = max(c0, cols.start), min(c1, cols.stop)
                    if lo >= hi or left >= right:
                        continue
                    tile = self._tile(source, p, j)  # [a, b] float64
                    w[lo - r0:hi - r0, left - c0:right - c0] += weight * tile[lo - rows.start:hi - rows.start,
                                                                              left - cols.start:right - cols.start]
        return w.astype(np.float32)

    def _tile(self, source: TileSource, p: int, j: int) -> np.ndarray:
        if not self.int8:
            return np.asarray(source.read_tile(p, j), np.float64)
        return dequantize_tile(*source.read_tile_int8(p, j)).astype(np.float64)  # int8 [a, b] · float32 [a]

    def _head_block(self, bands: BandSource, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        if self._place is None:
            order = np.asarray(bands.read_order())  # [V] adapter row → token id
            self._place = np.empty_like(order)
            self._place[order] = np.arange(len(order))  # token id → adapter row
        place = self._place[r0:r1]  # [n] adapter rows of the block's tokens
        band, within = np.divmod(place, bands.band_rows)
        out = np.empty((r1 - r0, c1 - c0), np.float32)
        for b in np.unique(band).tolist():
            hit = band == b
            out[hit] = self._band(bands, b)[within[hit], c0:c1]
        return out

    def _band(self, bands: BandSource, b: int) -> np.ndarray:
        """Band ``b``'s rows, float32 ``[rows, d_in]``, kept while they fit ``cache_bytes`` (oldest out first)."""
        got = self._bands.pop(b, None)
        if got is None and self.int8:
            got = dequantize_tile(*bands.read_band_int8(b))  # int8 [rows, d] · float32 [rows]
        elif got is None:
            got = np.asarray(bands.read_band_tiles(b), np.float32)
        self._bands[b] = got  # now the newest
        while sum(a.nbytes for a in self._bands.values()) > self.cache_bytes and len(self._bands) > 1:
            del self._bands[next(iter(self._bands))]
        return got
