"""The bands of a head adapter (``layout = "partition"``): band tiles, the row order and the band gate.

A head adapter (built by ``prismoe head``) has band tiles (``cols = 1``, ``tile_in = d_in``) and
stores only true rows; its pipes split the (permuted) output rows between them. Bands are numbered
across pipes, pipe 1 first. :class:`PartitionBands` gives :class:`~prismoe_store.stores.adapter.AdapterStore`
these methods; they refuse adapters of the ``ensemble`` layout.

>>> import numpy as np
>>> from prismoe_store.stores.adapter import AdapterStore
>>> a = AdapterStore.create_partition("memory://doc-bands", d_in=4, d_out=10, band_rows=4, overwrite=True)
>>> a.band_location(2), a.read_order()[:3].tolist()
((1, 0), [0, 1, 2])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from prismoe_store.errors import CorruptStoreError, DataError, StoreError
from prismoe_store.stores.formats import create_chunked
from prismoe_store.stores.verified import finite, reading

if TYPE_CHECKING:
    from collections.abc import Callable

    import zarr

    from prismoe_store.grid import GridSpec
    from prismoe_store.stores.formats import StoreOptions


class PartitionBands:
    """Band access for a head adapter; mixed into :class:`~prismoe_store.stores.adapter.AdapterStore`,
    whose group, grids, tiles and INT8 arrays it reads."""

    # provided by the adapter store
    group: zarr.Group
    url: str
    tiles: Callable[[int], zarr.Array]  # a pipe's float32 tile array
    read_band: Callable[[int, int], np.ndarray]  # (pipe, row) -> the band's tiles, checked
    int8_arrays: Callable[..., tuple[zarr.Array, zarr.Array]]  # a pipe's (tiles_int8, scales)

    if TYPE_CHECKING:  # read-only properties there
        @property
        def d_in(self) -> int: ...

        @property
        def d_out(self) -> int: ...

        @property
        def layout(self) -> str: ...

        @property
        def grids(self) -> list[GridSpec]: ...

        @property
        def options(self) -> StoreOptions: ...

    @property
    def band_rows(self) -> int:
        """Rows per band tile (the last band of the last pipe may hold fewer)."""
        return self.grids[0].tile_out

    @property
    def n_bands(self) -> int:
        """Bands of all pipes together (a partition adapter's unit of selection)."""
        return sum(-(-g.d_out // g.tile_out) for g in self.grids)

    def band_location(self, band: int) -> tuple[int, int]:
        """``(pipe, row)`` of global band ``band`` (bands are numbered across pipes, pipe 1 first)."""
        self._require_partition()
        if not 0 <= band < self.n_bands:
            raise StoreError(f"band {band} is outside 0..{self.n_bands - 1}")
        for p, g in enumerate(self.grids):
            n = -(-g.d_out // g.tile_out)
            if band < n:
                return p, band
            band -= n
        raise AssertionError("unreachable")

    def write_band_tiles(self, band: int, rows: np.ndarray) -> None:
        """Write global band ``band``: its true rows ``[≤ band_rows, d_in]`` float32."""
        p, r = self.band_location(band)
        g = self.grids[p]
        n = min(g.tile_out, g.d_out - r * g.tile_out)
        if rows.shape != (n, self.d_in):
            raise DataError(f"band {band} must be {(n, self.d_in)}, got {rows.shape}")
        self.tiles(p)[r * g.tile_out:r * g.tile_out + n, :] = np.asarray(rows, np.float32)

    def read_band_tiles(self, band: int) -> np.ndarray:
        """Global band ``band`` as float32 ``[rows, d_in]`` (its true rows only)."""
        p, r = self.band_location(band)
        return self.read_band(p, r)

    def read_band_int8(self, band: int) -> tuple[np.ndarray, np.ndarray]:
        """Global band ``band`` as ``(q int8 [rows, d_in], scales float32 [rows])``."""
        p, r = self.band_location(band)
        g = self.grids[p]
        qa, sa = self.int8_arrays(p)
        rows = slice(r * g.tile_out, (r + 1) * g.tile_out)
        what = f"INT8 band {band} in {self.url}"
        with reading(what):
            return qa[rows, :], finite(sa[rows, 0], what)

    def read_rows(self, positions: np.ndarray) -> np.ndarray:
        """Rows at adapter positions ``positions`` (any order) as float32 ``[n, d_in]``, read band by band."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.d_in), np.float32)
        bands = positions // self.band_rows
        for b in np.unique(bands):
            at = np.flatnonzero(bands == b)
            out[at] = self.read_band_tiles(int(b))[positions[at] - b * self.band_rows]
        return out

    def write_order(self, order: np.ndarray) -> None:
        """Store the row order: ``order[i]`` is the token id (original row) at adapter row ``i``."""
        self._require_partition()
        order = np.asarray(order)
        if order.shape != (self.d_out,) or not np.array_equal(np.sort(order), np.arange(self.d_out)):
            raise DataError(f"order must be a permutation of 0..{self.d_out - 1}")
        if "order" not in self.group:
            create_chunked(self.group, "order", (self.d_out,), (min(self.d_out, 1 << 18),), "int32", self.options)
        self.group["order"][...] = order.astype(np.int32)

    def read_order(self) -> np.ndarray:
        """The row order ``[d_out]`` int64 (identity when none was stored)."""
        self._require_partition()
        if "order" not in self.group:
            return np.arange(self.d_out, dtype=np.int64)
        with reading(f"row order in {self.url}"):
            order = self.group["order"][...].astype(np.int64)
        if not np.array_equal(np.sort(order), np.arange(self.d_out)):
            raise CorruptStoreError(f"the row order in {self.url} is not a permutation of 0..{self.d_out - 1}")
        return order

    def write_band_gate(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Write the band gate: ``weight [bands, d_in]``, ``bias [bands]`` float32, finite."""
        self._require_partition()
        weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        if weight.shape != (self.n_bands, self.d_in) or bias.shape != (self.n_bands,):
            raise DataError(f"band gate must be [{self.n_bands}, {self.d_in}] and [{self.n_bands}], "
                            f"got {weight.shape}, {bias.shape}")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise DataError("band gate holds NaN or Inf: refusing to store it")
        for name, data in (("gate_weight", weight), ("gate_bias", bias)):
            if name not in self.group:
                create_chunked(self.group, name, data.shape, data.shape, "float32", self.options)
            self.group[name][...] = data

    def read_band_gate(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(weight [bands, d_in], bias [bands])``, or ``None`` while the head is being built (its
        band gate is written last).

        Raises :class:`~prismoe_store.errors.CorruptStoreError` for a damaged gate, half a gate, and a
        missing one in a finished head adapter (which always has one); the message names the command
        that writes it again (:meth:`band_gate_advice`).
        """
        self._require_partition()
        present = [name in self.group for name in ("gate_weight", "gate_bias")]
        if not all(present):
            if any(present) or self.group.attrs.get("complete"):
                why = ("damaged, or its first write was cut short" if any(present)
                       else "which a finished head adapter always has")
                raise CorruptStoreError(f"the band gate of {self.url} is {'half ' if any(present) else ''}missing, "
                                        f"{why}: {self.band_gate_advice()}")
            return None
        with reading(f"band gate in {self.url}", advice=self.band_gate_advice()):
            weight, bias = self.group["gate_weight"][...], self.group["gate_bias"][...]
            finite(weight, f"the band gate of {self.url}")
            finite(bias, f"the band gate of {self.url}")
        return weight, bias

    def band_gate_advice(self) -> str:
        """What writes a lost or damaged band gate again: ``prismoe fit-gates --restart`` for a trained
        gate (its ``gates`` record), else the build's centroid gate (``prismoe head`` re-run)."""
        if isinstance(self.group.attrs.get("gates"), dict):
            return "train it again (prismoe fit-gates --restart)"
        return "re-run the same `prismoe head` command to write it again"

    def _require_partition(self) -> None:
        if self.layout != "partition":
            raise StoreError(f"adapter {self.url} has the {self.layout!r} layout: bands, order and band gate "
                             "belong to head adapters (`prismoe head`)")
