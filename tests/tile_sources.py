"""Tile sources the tests share: a wrapper that records every tile and band it serves."""

from __future__ import annotations

from prismoe_store.runtime.tile_source import TileSourceWrapper


class Recording(TileSourceWrapper):
    """A tile source that records every tile read, ``(pipe, worker)``, and every band read, ``band``
    (and stands in for any source that is not an adapter store)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.reads: list[tuple[int, int]] = []  # tiles served, in order
        self.band_reads: list[int] = []  # bands served, in order

    def read_tile(self, pipe, worker):
        self.reads.append((pipe, worker))
        return super().read_tile(pipe, worker)

    def read_tile_int8(self, pipe, worker):
        self.reads.append((pipe, worker))
        return super().read_tile_int8(pipe, worker)

    def read_band_tiles(self, band):
        self.band_reads.append(band)
        return super().read_band_tiles(band)

    def read_band_int8(self, band):
        self.band_reads.append(band)
        return super().read_band_int8(band)
