"""Weights store round trips, format checks, corruption detection and the progress record."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prismoe_store.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    StoreError,
    StoreFormatError,
    TensorNotFoundError,
)
from prismoe_store.grid import plan_grid
from prismoe_store.stores.formats import StoreOptions, create_checked, existing_kind
from prismoe_store.stores.progress import Progress
from prismoe_store.stores.weights import WEIGHTS_FORMAT, WEIGHTS_VERSION, WeightsStore

compressors = st.sampled_from(["none", "zstd", "blosc"])
dtypes = st.sampled_from(["float32", "float16", "float64", "int32"])


def _mem_url() -> str:
    return f"memory://test-stores-{uuid.uuid4().hex}"


def _matrix(rng: np.random.Generator, d_out: int, d_in: int, dtype: str) -> np.ndarray:
    if dtype.startswith("int"):
        return rng.integers(-1000, 1000, size=(d_out, d_in)).astype(dtype)
    m = rng.standard_normal((d_out, d_in)).astype(dtype)
    m[rng.random(m.shape) < 0.2] = 0  # some exact zeros, and maybe all-zero tiles (chunks zarr skips)
    return m


def _expected_tile(m: np.ndarray, grid, worker: int) -> np.ndarray:
    padded = np.zeros(grid.padded_shape, dtype=m.dtype)
    padded[: m.shape[0], : m.shape[1]] = m
    band, sl = grid.tile_region(worker)
    return padded[band, sl]


# -- round trips -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(1, 40), d_out=st.integers(1, 40), workers=st.integers(0, 4).map(lambda k: 1 << k),
       layout=st.sampled_from(["balanced", "wide"]), compressor=compressors, shard=st.booleans(),
       dtype=dtypes, seed=st.integers(0, 2**32 - 1))
def test_write_matrix_round_trip(d_in, d_out, workers, layout, compressor, shard, dtype, seed):
    rng = np.random.default_rng(seed)
    m = _matrix(rng, d_out, d_in, dtype)
    grid = plan_grid(d_in, d_out, workers, layout=layout)
    url = _mem_url()
    store = WeightsStore.create(url, options=StoreOptions(compressor=compressor, shard=shard))
    store.write_matrix("lm_head.weight", m, grid, source={"source": "test"})

    back = WeightsStore.open(url)
    assert back.tensors() == ["lm_head.weight"]
    assert back.grid("lm_head.weight") == grid
    assert back.options == StoreOptions(compressor=compressor, shard=shard)
    got = back.read("lm_head.weight")
    assert got.dtype == m.dtype and got.shape == m.shape
    np.testing.assert_array_equal(got, m)
    arr = back.array("lm_head.weight")
    assert arr.chunks == grid.tile_shape  # one chunk per tile
    assert (arr.shards is not None) == shard
    for j in range(grid.workers):
        tile = back.read_tile("lm_head.weight", j)
        assert tile.shape == grid.tile_shape and tile.dtype == m.dtype
        np.testing.assert_array_equal(tile, _expected_tile(m, grid, j))
    info = back.info("lm_head.weight")
    assert info["complete"] is True and info["source"] == "test" and info["dtype"] == dtype


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 30), d_out=st.integers(1, 30), workers=st.integers(0, 4).map(lambda k: 1 << k),
       compressor=compressors, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_tile_by_tile_resume(d_in, d_out, workers, compressor, seed, data):
    """Tiles written in any order over two sessions; the second session only sees what is missing."""
    rng = np.random.default_rng(seed)
    m = _matrix(rng, d_out, d_in, "float32")
    grid = plan_grid(d_in, d_out, workers)
    url = _mem_url()
    order = data.draw(st.permutations(range(grid.workers)), label="order")
    cut = data.draw(st.integers(0, grid.workers), label="cut")

    w = WeightsStore.create(url, options=StoreOptions(compressor=compressor)).begin("t", grid)
    for j in order[:cut]:
        w.write_tile(j, _expected_tile(m, grid, j))
    if cut < grid.workers:
        with pytest.raises(IncompleteStoreError):
            w.finish()
        with pytest.raises(IncompleteStoreError):
            WeightsStore.open(url).read("t")
        assert WeightsStore.open(url).tensors() == []
        assert WeightsStore.open(url).tensors(include_incomplete=True) == ["t"]

    w2 = WeightsStore.create(url).begin("t", grid)  # a second run resumes
    assert w2.missing() == sorted(order[cut:])
    for j in w2.missing():
        w2.write_tile(j, _expected_tile(m, grid, j))
    w2.finish()
    np.testing.assert_array_equal(WeightsStore.open(url).read("t"), m)


def test_local_path_round_trip_and_several_tensors(tmp_path):
    rng = np.random.default_rng(0)
    a, b = _matrix(rng, 33, 17, "float32"), _matrix(rng, 5, 70, "float16")
    url = tmp_path / "w.zarr"
    store = WeightsStore.create(url, options=StoreOptions(compressor="blosc", shard=True))
    store.write_matrix("model/embed_tokens.weight", a, plan_grid(17, 33, 8))
    store.write_matrix("lm_head%1", b, plan_grid(70, 5, 4, layout="wide"))
    back = WeightsStore.open(str(url))
    assert sorted(back.tensors()) == ["lm_head%1", "model/embed_tokens.weight"]
    np.testing.assert_array_equal(back.read("model/embed_tokens.weight"), a)
    np.testing.assert_array_equal(back.read("lm_head%1"), b)
    with pytest.raises(TensorNotFoundError, match="lm_head%1"):  # the message lists what is there
        back.read("nope")


def test_sharded_store_refuses_single_tiles():
    grid = plan_grid(8, 8, 4)
    w = WeightsStore.create(_mem_url(), options=StoreOptions(shard=True)).begin("t", grid)
    assert w.unit == "band" and w.missing() == list(range(grid.rows))
    with pytest.raises(StoreError):
        w.write_tile(0, np.zeros(grid.tile_shape, np.float32))


def test_write_matrix_shape_mismatch():
    store = WeightsStore.create(_mem_url())
    with pytest.raises(StoreError):
        store.write_matrix("t", np.zeros((4, 5), np.float32), plan_grid(4, 5, 2))


def test_resume_with_other_grid_or_dtype_is_refused():
    url = _mem_url()
    store = WeightsStore.create(url)
    store.begin("t", plan_grid(8, 8, 4))
    with pytest.raises(StoreError):
        WeightsStore.create(url).begin("t", plan_grid(8, 8, 2))
    with pytest.raises(StoreError):
        WeightsStore.create(url).begin("t", plan_grid(8, 8, 4), dtype="float16")


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_resume_keeps_the_tensors_shard_layout(first, second):
    """Re-running with other --shard options resumes the tensor in the layout it was begun with."""
    m = np.arange(64, dtype=np.float32).reshape(8, 8) + 1
    grid = plan_grid(8, 8, 4)
    url = _mem_url()
    w = WeightsStore.create(url, options=StoreOptions(shard=first)).begin("t", grid)
    w.write_band(0, m[:4])
    w2 = WeightsStore.create(url, options=StoreOptions(shard=second)).begin("t", grid)
    assert w2.sharded == first
    assert w2.missing() == ([1] if first else [2, 3])
    w2.write_band(1, m[4:])
    w2.finish()
    np.testing.assert_array_equal(WeightsStore.open(url).read("t"), m)


def test_create_refuses_to_clobber_other_format(tmp_path):
    url = str(tmp_path / "s")
    create_checked(url, "pairs", 1)
    with pytest.raises(StoreFormatError):
        WeightsStore.create(url)
    with pytest.raises(StoreFormatError, match="replaces only a weights store"):
        WeightsStore.create(url, overwrite=True)  # --overwrite replaces only a store of the same kind
    assert existing_kind(url) == "pairs"  # left as it was


# -- format checks -----------------------------------------------------------------------------


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        WeightsStore.open(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    "attrs, match",
    [
        ({"prismoe_store": {"format": "pairs", "version": 1}}, "pairs"),
        ({"prismoe_store": {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION + 1}}, "version"),
        ({}, "not a prismoe store"),
        ({"prismoe_store": "weights"}, "not a prismoe store"),
    ],
)
def test_format_or_version_mismatch(tmp_path, attrs, match):
    url = str(tmp_path / "s")
    g = zarr.open_group(url, mode="w", zarr_format=3)
    g.attrs.update(attrs)
    with pytest.raises(StoreFormatError, match=match):
        WeightsStore.open(url)
    mem = _mem_url()
    zarr.open_group(mem, mode="w", zarr_format=3).attrs.update(attrs)
    with pytest.raises(StoreFormatError, match=match):
        WeightsStore.open(mem)


def test_zarr_v2_group_is_refused(tmp_path):
    url = str(tmp_path / "v2")
    g = zarr.open_group(url, mode="w", zarr_format=2)
    g.attrs.update({"prismoe_store": {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION}})
    with pytest.raises(StoreFormatError, match="v2"):
        WeightsStore.open(url)


# -- corruption --------------------------------------------------------------------------------


def _chunk_files(url: str, tensor: str = "t") -> list[str]:
    root = os.path.join(url, "tensors", tensor, "c")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _written_store(tmp_path, compressor: str, shard: bool, d_in: int = 20, d_out: int = 24) -> tuple[str, np.ndarray]:
    url = str(tmp_path / f"{compressor}-{shard}")
    m = np.random.default_rng(1).standard_normal((d_out, d_in)).astype(np.float32)
    WeightsStore.create(url, options=StoreOptions(compressor=compressor, shard=shard)).write_matrix(
        "t", m, plan_grid(d_in, d_out, 8))
    return url, m


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_flipped_byte_is_detected(tmp_path, compressor, shard, where):
    url, _ = _written_store(tmp_path, compressor, shard)
    path = _chunk_files(url)[-1]
    data = bytearray(open(path, "rb").read())
    data[min(int(len(data) * where), len(data) - 1)] ^= 0x5A
    open(path, "wb").write(bytes(data))
    store = WeightsStore.open(url)
    with pytest.raises(CorruptStoreError):
        store.read("t")
    grid = store.grid("t")
    with pytest.raises(CorruptStoreError):  # the tile in that chunk, read alone
        for j in range(grid.workers):
            store.read_tile("t", j)


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("keep", [0.5, 3])
def test_truncated_chunk_is_detected(tmp_path, compressor, shard, keep):
    url, _ = _written_store(tmp_path, compressor, shard)
    path = _chunk_files(url)[0]
    data = open(path, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    open(path, "wb").write(data[:n])
    with pytest.raises(CorruptStoreError):
        WeightsStore.open(url).read("t")


def test_empty_chunk_file_is_detected(tmp_path):
    url, _ = _written_store(tmp_path, "zstd", False)
    open(_chunk_files(url)[0], "wb").close()
    with pytest.raises(CorruptStoreError):
        WeightsStore.open(url).read("t")


def test_empty_shard_file_is_detected(tmp_path):
    url, _ = _written_store(tmp_path, "zstd", True, d_in=16, d_out=32)  # whole bands: zarr reads whole shards
    open(_chunk_files(url)[0], "wb").close()
    with pytest.raises(CorruptStoreError):
        WeightsStore.open(url).read("t")


@pytest.mark.parametrize("shard", [False, True])
def test_deleted_chunk_file_is_detected(tmp_path, shard):
    url, _ = _written_store(tmp_path, "zstd", shard, d_in=16, d_out=32)
    os.remove(_chunk_files(url)[-1])
    with pytest.raises(CorruptStoreError):
        WeightsStore.open(url).read("t")


def test_corrupt_metadata_is_a_store_error(tmp_path):
    url, _ = _written_store(tmp_path, "zstd", False)
    with open(os.path.join(url, "zarr.json"), "w") as f:
        f.write("{ not json")
    with pytest.raises(StoreError):
        WeightsStore.open(url)


# -- the progress record -----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(units=st.integers(1, 40), data=st.data())
def test_progress_record(units, data):
    url = _mem_url()
    g = zarr.open_group(url, mode="w", zarr_format=3)
    assert Progress.open(g, "tiles") is None
    p = Progress.create(g, "tiles", units)
    assert p.units == units and p.done() == [] and p.missing() == list(range(units)) and not p.complete()
    marked = data.draw(st.sets(st.integers(0, units - 1)), label="marked")
    for u in marked:
        p.mark(u)
    p.mark(next(iter(marked))) if marked else None  # marking twice is harmless
    assert p.done() == sorted(marked)
    assert p.missing() == sorted(set(range(units)) - marked)
    assert p.complete() == (len(marked) == units)
    # the record persists: reopened and re-created (same size) it keeps its marks
    g2 = zarr.open_group(url, mode="r+")
    assert Progress.open(g2, "tiles").done() == sorted(marked)
    assert Progress.create(g2, "tiles", units).done() == sorted(marked)
    with pytest.raises(StoreError):
        Progress.create(g2, "tiles", units + 1)


def test_done_is_the_record_not_chunk_presence():
    """An all-zero tile is written (so a missing chunk means damage) and done; a chunk written
    without a mark is not done."""
    grid = plan_grid(4, 4, 4)
    w = WeightsStore.create(_mem_url(), options=StoreOptions(compressor="none")).begin("t", grid)
    w.write_tile(0, np.zeros(grid.tile_shape, np.float32))
    assert w.array.nchunks_initialized == 1 and w.missing() == [1, 2, 3]
    w.array[0:2, 2:4] = 1.0  # tile 1's data, but no mark
    assert w.array.nchunks_initialized == 2 and w.missing() == [1, 2, 3]


def test_options_and_format_attribute_are_json(tmp_path):
    url = tmp_path / "s"
    WeightsStore.create(url, options=StoreOptions(compressor="none", level=0))
    meta = json.loads((url / "zarr.json").read_text())
    assert meta["attributes"]["prismoe_store"] == {"format": "weights", "version": 1, "chunk_records": True}
    assert meta["attributes"]["options"] == {"compressor": "none", "level": 0, "shard": False}
    with pytest.raises(StoreError):
        StoreOptions(compressor="lz4")
    with pytest.raises(StoreError):
        StoreOptions(level=30)


def test_deleting_a_group_removes_chunks_and_records_and_forgets_them(tmp_path):
    """``del group[name]`` on a local verified store unlinks every chunk and record under it (in
    threads) and forgets their cached records: the same array written again reads back, the
    neighbours are untouched."""
    from prismoe_store.stores.adapter import AdapterStore
    from prismoe_store.stores.formats import create_chunked

    g = plan_grid(64, 128, 8)
    a = AdapterStore.create(str(tmp_path / "a"), grids=[g], overwrite=True)
    tiles = np.arange(np.prod(g.padded_shape), dtype=np.float32).reshape(g.padded_shape)
    a.tiles(0)[...] = tiles
    scratch = a.group.create_group("_fit")
    rng = np.random.default_rng(0)
    first = rng.standard_normal((40, 24))
    arr = create_chunked(scratch, "b", first.shape, (8, 8), "float64", StoreOptions(compressor="none"))
    arr[...] = first
    assert np.array_equal(arr[...], first)  # its records are now cached by the store
    folder = tmp_path / "a" / "_fit"
    assert any(p.name == "_crc" for p in folder.rglob("*")) and len(list(folder.rglob("*"))) > 20
    del a.group["_fit"]
    assert not folder.exists()
    assert np.array_equal(a.tiles(0)[...], tiles)
    again = rng.standard_normal((40, 24))
    arr = create_chunked(a.group.create_group("_fit"), "b", again.shape, (8, 8), "float64",
                         StoreOptions(compressor="none"))
    arr[...] = again
    reopened = AdapterStore.open(str(tmp_path / "a"))
    assert np.array_equal(reopened.group["_fit/b"][...], again)
    assert np.array_equal(arr[...], again)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d_in=st.integers(1, 40), d_out=st.integers(1, 40), workers=st.sampled_from([1, 4, 16]))
def test_an_adapter_band_stores_its_live_tiles_only(tmp_path, d_in, d_out, workers):
    """write_band stores one chunk per tile not wholly in padding (band_chunks lists them, and only
    them); the band reads back as written on the true matrix and as zeros in the padding."""
    from prismoe_store.stores.adapter import AdapterStore

    g = plan_grid(d_in, d_out, workers)
    url = str(tmp_path / f"a-{uuid.uuid4().hex}")
    a = AdapterStore.create(url, grids=[g])
    rng = np.random.default_rng(d_in * 100 + d_out)
    full = rng.standard_normal(g.padded_shape).astype(np.float32)
    for r in range(g.rows):
        a.write_band(0, r, full[r * g.tile_out:(r + 1) * g.tile_out])
    stored = sorted(os.path.relpath(os.path.join(root, f), os.path.join(url, "pipe1", "tiles", "c"))
                    for root, _, files in os.walk(os.path.join(url, "pipe1", "tiles", "c")) for f in files)
    listed = sorted(f"{r}/{c}" for r in range(g.rows) for _, (_, c) in a.band_chunks(0, r))
    assert stored == listed and len(listed) == g.active_count
    live = [j for j in range(g.workers) if not g.is_padding(j)]
    assert {f"{j // g.cols}/{j % g.cols}" for j in live} == set(listed)
    back = np.concatenate([a.read_band(0, r) for r in range(g.rows)])
    rows, cols = g.live_shape
    if g.is_band_grid:  # a band grid stores the true matrix only (no padding rows or columns)
        assert back.shape == (d_out, d_in)
        rows, cols = d_out, d_in
    assert np.array_equal(back[:rows, :cols], full[:rows, :cols])
    assert not back[rows:].any() and not back[:, cols:].any()
