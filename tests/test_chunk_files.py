"""Direct chunk-file reads (prismoe_store.stores.chunk_files): the same values as Zarr, the same refusals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from prismoe_store.errors import CorruptStoreError
from prismoe_store.stores.chunk_files import region_reader
from prismoe_store.stores.formats import StoreOptions, create_chunked, open_root
from prismoe_store.stores.pairs import PairsStore

ROWS, D_IN, D_OUT = 300, 24, 40  # ragged: the last row chunk is partly filled


@pytest.fixture()
def pairs(tmp_path):
    rng = np.random.default_rng(3)
    store = PairsStore.create(tmp_path / "p", d_in=D_IN, d_out=D_OUT, rows_per_chunk=64, col_chunks=(8, 16))
    x = rng.standard_normal((ROWS, D_IN), dtype=np.float32)
    z = rng.standard_normal((ROWS, D_OUT), dtype=np.float32)
    store.append(x, z)
    return PairsStore.open(tmp_path / "p"), x, z


def regions():
    return [(slice(0, ROWS), slice(0, D_OUT)), (slice(5, 200), slice(3, 37)), (slice(256, 300), slice(16, 32)),
            (slice(63, 65), slice(15, 17))]


def test_direct_reads_equal_zarr_and_the_written_rows(pairs):
    store, _, z = pairs
    r = region_reader(store.z)
    assert r.direct and r.records and r.strict  # a pairs store: local, uncompressed, chunk records
    for rows, cols in regions():
        out = np.full((rows.stop - rows.start, cols.stop - cols.start), np.nan, np.float32)
        got = r.read(rows, cols, out)
        np.testing.assert_array_equal(got, store.z[rows, cols])
        np.testing.assert_array_equal(got, z[rows, cols])
    assert r.fallbacks == 0


def test_dest_permutes_rows_while_copying(pairs):
    store, x, _ = pairs
    rows = slice(10, 250)
    n = rows.stop - rows.start
    order = np.argsort(np.random.default_rng(0).random(n), kind="stable")
    dest = np.empty_like(order)
    dest[order] = np.arange(n)
    out = region_reader(store.x).read(rows, slice(None), np.empty((n, D_IN), np.float32), dest=dest)
    np.testing.assert_array_equal(out, x[rows][order])  # the same as reading, then np.take(order)


def test_leading_axes_of_chunk_one(tmp_path):
    g = open_root(tmp_path / "s", "w")
    a = create_chunked(g, "h", (3, 50, 40), (1, 50, 16), "float32", StoreOptions(compressor="none"))
    data = np.random.default_rng(1).standard_normal((3, 50, 40), dtype=np.float32)
    a[...] = data
    r = region_reader(a)
    assert r.direct
    for b in range(3):
        got = r.read(slice(0, 37), slice(5, 40), np.empty((37, 35), np.float32), lead=(b,))
        np.testing.assert_array_equal(got, data[b, :37, 5:40])


def test_other_encodings_and_stores_read_through_zarr(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(6, 10)
    zstd = zarr.create_array(str(tmp_path / "zstd"), shape=(6, 10), chunks=(4, 4), dtype="float32")  # zarr's default
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=(6, 10), chunks=(4, 4), dtype="float32",
                            compressors=[Crc32cCodec()])
    plain = zarr.create_array(str(tmp_path / "plain"), shape=(6, 10), chunks=(4, 4), dtype="float32",
                              compressors=[Crc32cCodec()])  # no chunk records (not a prismoe store)
    for a, direct in ((zstd, False), (mem, False), (plain, True)):
        a[...] = data
        r = region_reader(a)
        assert r.direct is direct
        np.testing.assert_array_equal(r.read(slice(1, 6), slice(2, 9), np.empty((5, 7), np.float32)), data[1:6, 2:9])
        got = r.read(slice(0, 6), slice(0, 10), np.empty((6, 10), np.float32), dest=np.array([5, 4, 3, 2, 1, 0]))
        np.testing.assert_array_equal(got, data[::-1])


def _chunk_path(array, coords):
    root = str(array.store_path.store.inner.root)
    return os.path.join(root, array.store_path.path, array.metadata.encode_chunk_key(coords))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_damaged_chunks_are_refused_as_zarr_refuses_them(pairs, damage):
    store, _, _ = pairs
    path = _chunk_path(store.z, (1, 1))
    if damage == "flip":
        raw = bytearray(Path(path).read_bytes())
        raw[10] ^= 0xFF
        Path(path).write_bytes(bytes(raw))
    elif damage == "truncate":
        Path(path).write_bytes(Path(path).read_bytes()[:-8])
    elif damage == "delete":
        os.remove(path)
    else:  # another chunk's bytes: a valid crc32c, but not what the record says was written here
        shutil.copyfile(_chunk_path(store.z, (2, 1)), path)
    store = PairsStore.open(store.url)
    r = region_reader(store.z)
    assert r.direct
    with pytest.raises(CorruptStoreError) as got:
        r.read(slice(0, ROWS), slice(0, D_OUT), np.empty((ROWS, D_OUT), np.float32))
    with pytest.raises(CorruptStoreError) as want:
        store.z[0:ROWS, 0:D_OUT]
    assert type(got.value) is type(want.value)
    assert str(got.value).split(":")[0] == str(want.value).split(":")[0]  # the store's own message
    assert r.fallbacks == 1


def test_a_store_without_records_trusts_the_crc32c_only(tmp_path):
    a = zarr.create_array(str(tmp_path / "plain"), shape=(8, 8), chunks=(4, 4), dtype="float32",
                          compressors=[Crc32cCodec()])
    a[...] = np.ones((8, 8), np.float32)
    path = Path(_chunk_path_plain(a, (0, 1)))
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01
    path.write_bytes(bytes(raw))
    r = region_reader(zarr.open_array(str(tmp_path / "plain"), mode="r"))
    with pytest.raises(ValueError, match="checksum"):  # zarr's own error, from the fallback read
        r.read(slice(0, 8), slice(0, 8), np.empty((8, 8), np.float32))


def _chunk_path_plain(array, coords):
    return os.path.join(str(array.store_path.store.root), array.store_path.path,
                        array.metadata.encode_chunk_key(coords))
