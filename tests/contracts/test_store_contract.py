"""The store contract, run against every store kind.

Kinds: a weights store (plain, and sharded: one shard per band), a pairs store, a hidden-only pairs
store, an adapter (fp32 tiles), an adapter with INT8 tiles, a head adapter (band tiles, row order).
Each is written here through its own API and must: read back what was written bit for bit after a
reopen; be refused (:class:`~prismoe_store.errors.StoreFormatError`) when opened as another kind or
when its format version is not the library's; never be replaced by another kind's ``create``, even
with ``overwrite`` (a store of its own kind is); detect a chunk that is truncated, missing or
swapped with another (:class:`~prismoe_store.errors.CorruptStoreError`, never zeros); and keep a
progress record across a reopen whose units come back unfinished when their chunks are damaged.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from prismoe_store.errors import CorruptStoreError, StoreError, StoreFormatError
from prismoe_store.grid import plan_grid, plan_pipes
from prismoe_store.stores.adapter import ADAPTER_FORMAT, ADAPTER_VERSION, AdapterStore
from prismoe_store.stores.formats import (
    FORMAT_KEY,
    StoreOptions,
    existing_kind,
    format_attrs,
)
from prismoe_store.stores.pairs import PAIRS_FORMAT, PAIRS_VERSION, PairsStore
from prismoe_store.stores.progress import Progress, recheck
from prismoe_store.stores.weights import WEIGHTS_FORMAT, WEIGHTS_VERSION, WeightsStore

RNG = np.random.default_rng(15)
W = RNG.standard_normal((32, 24)).astype(np.float32)  # a weights tensor (several tiles and bands)
X = RNG.standard_normal((40, 6)).astype(np.float32)  # pairs: x, z (4 row chunks of 10)
Z = RNG.standard_normal((40, 4)).astype(np.float32)
ADAPTER_GRIDS = plan_pipes(16, 32, 4)
TILES = [RNG.standard_normal(g.padded_shape).astype(np.float32) for g in ADAPTER_GRIDS]
HEAD_ROWS = RNG.standard_normal((40, 8)).astype(np.float32)  # a head adapter's rows (5 bands of 8)
HEAD_ORDER = RNG.permutation(40)


@dataclass(frozen=True)
class Kind:
    name: str  # test id
    format: str  # the format tag the store carries
    version: int  # the library's version of that format
    cls: type  # the store class that opens it
    make: Callable[[str], object]  # write a store of this kind at a path
    read_all: Callable[[object], list[np.ndarray]]  # read everything back through the store's API
    expected: Callable[[], list[np.ndarray]]  # what read_all must return
    array: str  # an array of several chunks (or shards) with distinct contents, damaged by the tests


def _weights(shard: bool):
    def make(url):
        s = WeightsStore.create(url, options=StoreOptions(shard=shard))
        s.write_matrix("t", W, plan_grid(24, 32, 8))
        return s
    return make


def _pairs(hidden_only: bool):
    def make(url):
        s = PairsStore.create(url, d_in=6, d_out=0 if hidden_only else 4, rows_per_chunk=10)
        s.append(X, Z[:, :0] if hidden_only else Z)
        return s
    return make


def _adapter(int8: bool):
    def make(url):
        a = AdapterStore.create(url, grids=ADAPTER_GRIDS, mode="joint")
        for p, g in enumerate(ADAPTER_GRIDS):
            for r in range(g.rows):
                a.write_band(p, r, TILES[p][r * g.tile_out:(r + 1) * g.tile_out])
        if int8:
            from prismoe_store.runtime.quant import quantize_adapter

            quantize_adapter(a)
        a.update_attrs(complete=True)
        return a
    return make


def _head(url):
    a = AdapterStore.create_partition(url, d_in=8, d_out=40, band_rows=8)
    for b in range(a.n_bands):
        a.write_band_tiles(b, HEAD_ROWS[b * 8:(b + 1) * 8])
    a.write_order(HEAD_ORDER)
    a.update_attrs(complete=True)
    return a


def _int8_tiles(a: AdapterStore) -> list[np.ndarray]:
    return [x for p, g in enumerate(a.grids) for j in range(g.workers) for x in a.read_tile_int8(p, j)]


def _quantized() -> list[np.ndarray]:
    from prismoe_store.runtime.quant import quantize_tile

    out = []
    for p, g in enumerate(ADAPTER_GRIDS):
        for j in range(g.workers):
            q, s = quantize_tile(TILES[p][g.tile_region(j)])
            out += [q, s]
    return out


KINDS = [
    Kind("weights", WEIGHTS_FORMAT, WEIGHTS_VERSION, WeightsStore, _weights(False),
         lambda s: [s.read("t")], lambda: [W], "tensors/t"),
    Kind("weights-sharded", WEIGHTS_FORMAT, WEIGHTS_VERSION, WeightsStore, _weights(True),
         lambda s: [s.read("t")], lambda: [W], "tensors/t"),
    Kind("pairs", PAIRS_FORMAT, PAIRS_VERSION, PairsStore, _pairs(False),
         lambda s: list(s.read(0, s.rows)), lambda: [X, Z], "z"),
    Kind("pairs-hidden-only", PAIRS_FORMAT, PAIRS_VERSION, PairsStore, _pairs(True),
         lambda s: [s.read_x(0, s.rows)], lambda: [X], "x"),
    Kind("adapter", ADAPTER_FORMAT, ADAPTER_VERSION, AdapterStore, _adapter(False),
         lambda a: [a.read_band(p, r) for p, g in enumerate(a.grids) for r in range(g.rows)],
         lambda: [t[r * g.tile_out:(r + 1) * g.tile_out] for t, g in zip(TILES, ADAPTER_GRIDS, strict=True)
                  for r in range(g.rows)], "pipe2/tiles"),
    Kind("adapter-int8", ADAPTER_FORMAT, ADAPTER_VERSION, AdapterStore, _adapter(True), _int8_tiles, _quantized,
         "pipe1/tiles_int8"),
    Kind("head-adapter", ADAPTER_FORMAT, ADAPTER_VERSION, AdapterStore, _head,
         lambda a: [a.read_band_tiles(b) for b in range(a.n_bands)] + [a.read_order()],
         lambda: [HEAD_ROWS[b * 8:(b + 1) * 8] for b in range(5)] + [HEAD_ORDER], "pipe1/tiles"),
]

OPEN = {WEIGHTS_FORMAT: WeightsStore.open, PAIRS_FORMAT: PairsStore.open, ADAPTER_FORMAT: AdapterStore.open}
CREATE = {  # a small store of each format, created with overwrite
    WEIGHTS_FORMAT: lambda url: WeightsStore.create(url, overwrite=True),
    PAIRS_FORMAT: lambda url: PairsStore.create(url, d_in=3, d_out=2, overwrite=True),
    ADAPTER_FORMAT: lambda url: AdapterStore.create(url, grids=[plan_grid(4, 4, 2)], overwrite=True),
}


FRESH = {  # true of the store CREATE just made, false of every store KINDS makes
    WEIGHTS_FORMAT: lambda s: s.tensors(include_incomplete=True) == [],
    PAIRS_FORMAT: lambda s: s.rows == 0 and s.d_in == 3,
    ADAPTER_FORMAT: lambda s: s.d_in == 4 and s.n_pipes == 1,
}


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request) -> Kind:
    return request.param


@pytest.fixture
def made(tmp_path, kind) -> str:
    url = str(tmp_path / kind.name)
    kind.make(url)
    return url


def _same(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    return len(got) == len(want) and all(g.shape == w.shape and np.array_equal(g, w)
                                         for g, w in zip(got, want, strict=True))


def _chunk_files(url: str, array: str) -> list[Path]:
    return sorted(p for p in (Path(url) / array / "c").rglob("*") if p.is_file())


def _coords(url: str, array: str, path: Path) -> tuple[int, ...]:
    return tuple(int(i) for i in path.relative_to(Path(url) / array / "c").parts)


# -- round trip and format checks -------------------------------------------------------------------


def test_round_trip_after_reopen(kind, made):
    store = kind.cls.open(made)
    assert existing_kind(made) == kind.format
    assert _same(kind.read_all(store), kind.expected())


def test_nothing_there_is_no_store(kind, tmp_path):
    with pytest.raises(StoreError, match="no store"):
        kind.cls.open(tmp_path / "nothing-here")


def test_another_kind_is_refused(kind, made):
    for fmt, open_ in OPEN.items():
        if fmt != kind.format:
            with pytest.raises(StoreFormatError, match=f"is an? {kind.format} store, not an? {fmt} store"):
                open_(made)


def test_another_format_version_is_refused(kind, made):
    zarr.open_group(made, mode="r+").attrs.update(format_attrs(kind.format, kind.version + 1))
    with pytest.raises(StoreFormatError, match=f"version {kind.version + 1}, this library reads version"):
        kind.cls.open(made)
    del_tag = zarr.open_group(made, mode="r+")
    del del_tag.attrs[FORMAT_KEY]
    with pytest.raises(StoreFormatError, match="not a prismoe store"):
        kind.cls.open(made)


def _create_head(url):
    return AdapterStore.create_partition(url, d_in=4, d_out=8, band_rows=4, overwrite=True)


def test_overwrite_never_replaces_another_kind(kind, made):
    for fmt, create in CREATE.items():
        if fmt != kind.format:
            with pytest.raises(StoreFormatError, match=f"holds an? {kind.format} store"):
                create(made)
    head = kind.name == "head-adapter"
    if kind.format == ADAPTER_FORMAT:  # a fitted adapter and a head adapter are other kinds to each other
        have, other = ("a head adapter", CREATE[ADAPTER_FORMAT]) if head else ("a fitted adapter", _create_head)
        with pytest.raises(StoreFormatError, match=f"holds {have}, not"):
            other(made)
    assert _same(kind.read_all(kind.cls.open(made)), kind.expected())  # untouched
    (_create_head if head else CREATE[kind.format])(made)  # a store of its own kind is replaced
    assert FRESH[kind.format](kind.cls.open(made))


def test_create_without_overwrite_is_refused(kind, made):
    if kind.format == WEIGHTS_FORMAT:  # a weights store is reopened to add or resume tensors instead
        assert WeightsStore.create(made).tensors() == ["t"]
        return
    with pytest.raises(StoreError, match="already exists"):
        kind.make(made)


# -- damaged chunks --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "missing", "swapped"])
def test_a_damaged_chunk_is_detected(kind, made, damage):
    files = _chunk_files(made, kind.array)
    assert len(files) >= 2
    first, second = files[0].read_bytes(), files[1].read_bytes()
    if damage == "truncated":
        files[0].write_bytes(first[: len(first) // 2])
    elif damage == "missing":
        files[0].unlink()
    else:
        assert first != second
        files[0].write_bytes(second)
        files[1].write_bytes(first)
    with pytest.raises(CorruptStoreError, match=f"{kind.array}/c/"):
        kind.read_all(kind.cls.open(made))


# -- the progress record ---------------------------------------------------------------------------


def test_progress_survives_a_reopen_and_damage_undoes_a_unit(kind, made):
    """A job's units are the chunks of ``kind.array``: finished ones stay finished after a reopen,
    and :func:`recheck` marks the one whose chunk was damaged unfinished (the job redoes it)."""
    store = kind.cls.open(made, "r+")
    arr = store.group[kind.array]
    step = arr.shards or arr.chunks
    coords = list(itertools.product(*(range(-(-n // c)) for n, c in zip(arr.shape, step, strict=True))))
    record = Progress.create(store.group, "contract", len(coords))
    record.mark_many(range(len(coords) - 1))  # the last unit is not finished
    reopened = kind.cls.open(made, "r+")
    again = Progress.open(reopened.group, "contract")
    assert again.units == len(coords) and again.missing() == [len(coords) - 1]
    assert recheck(again, lambda u: [(reopened.group[kind.array], coords[u])]) == []  # nothing damaged yet
    victim = _chunk_files(made, kind.array)[0]
    unit = coords.index(_coords(made, kind.array, victim))
    victim.write_bytes(victim.read_bytes()[:-1])
    fresh = kind.cls.open(made, "r+")
    latest = Progress.open(fresh.group, "contract")
    assert recheck(latest, lambda u: [(fresh.group[kind.array], coords[u])]) == [unit]
    assert latest.missing() == sorted({unit, len(coords) - 1})
    assert os.path.exists(victim)
