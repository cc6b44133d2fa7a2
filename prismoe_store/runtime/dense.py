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
    if source.layout == "partition":
        bands = cast(BandSource, source)  # a partition-layout source is a head adapter: a BandSource
        order = np.asarray(bands.read_order())  # [V] adapter row → token id
        head = np.empty((bands.d_out, bands.d_in), np.float32)
        for b in range(bands.n_bands):
            band = np.asarray(bands.read_band_tiles(b), np.float32)  # [≤ a, d_in]
            start = b * bands.band_rows
            head[order[start:start + len(band)]] = band
        return head
    w = np.zeros((source.d_out, source.d_in), np.float64)
    for p, (alpha, g) in enumerate(zip(source.alphas, source.grids, strict=True)):
        weight = alpha * tile_scale(source.mode, g)
        for j in g.active_workers():
            rows, cols = g.valid_region(j)
            tile = np.asarray(source.read_tile(p, j), np.float64)  # [a, b]
            w[rows, cols] += weight * tile[: rows.stop - rows.start, : cols.stop - cols.start]
    return w.astype(np.float32)
