"""Reading regions of a local, uncompressed Zarr v3 array straight from its chunk files.

The fit reads every pairs row once, in row blocks of the full (or a panel-aligned) width. Through
Zarr's codec pipeline and :class:`~prismoe_store.stores.verified.VerifiedStore` that cost about 2
CPU-seconds per GB on the 2-core machine this was measured on (per chunk: event-loop round trips
holding the GIL, a fresh buffer per chunk file and per record, the checks, a copy out of the
decoded chunk), CPU and GIL time taken from the products. An array whose chunks are plain
little-endian bytes followed by Zarr's crc32c (the pairs store's default encoding,
``compressor="none"``) on a local file system can be read with one ``readinto`` per chunk into one
reused buffer, the same checks made (the crc32c with the ``google_crc32c`` that Zarr's codec
uses; the chunk record with :func:`~prismoe_store.stores.verified.record_accepts`) and the chunk copied into
place: about 0.5 CPU-seconds per GB, most of it outside the GIL.

A chunk that fails any check here (missing, wrong size, checksum, no or another record) is read
again through Zarr and the store, which retry a chunk being rewritten and raise
:class:`~prismoe_store.errors.CorruptStoreError` with their own message: the reader never accepts
what the store would refuse. :func:`region_reader` falls back to plain Zarr reads (into the
caller's array, no fresh allocation) for any other array (compressed, sharded, remote, in memory).

>>> import numpy as np, zarr, tempfile
>>> from zarr.codecs import Crc32cCodec
>>> path = tempfile.mkdtemp()
>>> a = zarr.create_array(path, shape=(6, 5), chunks=(4, 2), dtype="float32", compressors=[Crc32cCodec()])
>>> a[:] = np.arange(30, dtype=np.float32).reshape(6, 5)
>>> r = region_reader(zarr.open_array(path, mode="r"))
>>> r.direct, r.read(slice(1, 6), slice(1, 4), np.empty((5, 3), np.float32))[0].tolist()
(True, [6.0, 7.0, 8.0])
>>> r.read(slice(0, 3), slice(0, 2), np.empty((3, 2), np.float32), dest=np.array([2, 0, 1]))[:, 0].tolist()
[5.0, 10.0, 0.0]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import zarr

from prismoe_store.stores.verified import VerifiedStore, record_accepts, record_key

_CRC_BYTES = 4  # Zarr's crc32c codec appends the checksum (uint32, little-endian) to the chunk's bytes


@dataclass
class RegionReader:
    """Reads ``array[rows, cols]`` into a caller's array: from the chunk files when ``direct``, else through Zarr."""

    array: zarr.Array  # the array read
    root: str | None  # the store's folder on the local file system (``direct`` readers only)
    direct: bool  # True: chunk files are read without Zarr's codec pipeline
    records: bool = False  # True: chunks carry records (a VerifiedStore) that must accept them
    strict: bool = False  # True: a chunk without a record is refused (read through the store, which says so)
    fallbacks: int = 0  # chunks read through Zarr because a check here failed
    _buf: bytearray | None = field(default=None, repr=False)  # one chunk's bytes, reused across chunks

    def read(self, rows: slice, cols: slice, out: np.ndarray, *, dest: np.ndarray | None = None,
             lead: tuple[int, ...] = ()) -> np.ndarray:
        """Fill ``out`` (C-contiguous, shape of the region, the array's dtype) with ``array[*lead, rows, cols]``;
        with ``dest`` (a permutation of the region's rows), row ``i`` of the region goes to row
        ``dest[i]`` of ``out`` (reordered while copied, no second buffer). ``lead``: indices of the
        leading axes of an array of more than two (whose chunks are 1 along them).

        Raises :class:`~prismoe_store.errors.CorruptStoreError` (from the store) for a damaged or missing chunk.
        """
        lead = tuple(int(i) for i in lead)
        if not self.direct:
            if dest is None:
                self._zarr_read((*lead, rows, cols), out)
            else:
                out[dest] = self.array.get_basic_selection((*lead, rows, cols))
            return out
        (r0, r1, _), (c0, c1, _) = rows.indices(self.array.shape[-2]), cols.indices(self.array.shape[-1])
        rc, cc = self.array.chunks[-2:]
        size = rc * cc * self.array.dtype.itemsize
        if self._buf is None:
            self._buf = bytearray(size + _CRC_BYTES)
        chunk = np.frombuffer(self._buf, self.array.dtype, rc * cc).reshape(rc, cc)
        for i in range(r0 // rc, -(-r1 // rc)):
            lo, hi = max(r0, i * rc), min(r1, (i + 1) * rc)
            for j in range(c0 // cc, -(-c1 // cc)):
                left, right = max(c0, j * cc), min(c1, (j + 1) * cc)
                where = slice(lo - r0, hi - r0) if dest is None else dest[lo - r0:hi - r0]
                if self._chunk(self._key((*lead, i, j)), size):
                    out[where, left - c0:right - c0] = chunk[lo - i * rc:hi - i * rc, left - j * cc:right - j * cc]
                else:
                    self.fallbacks += 1
                    out[where, left - c0:right - c0] = self.array.get_basic_selection(
                        (*lead, slice(lo, hi), slice(left, right)))
        return out

    def _key(self, coords: tuple[int, ...]) -> str:
        path = self.array.store_path.path
        return "/".join(filter(None, (path, self.array.metadata.encode_chunk_key(coords))))

    def _chunk(self, key: str, size: int) -> bool:
        """Read chunk ``key`` into the buffer; True when it passes every check."""
        import google_crc32c

        assert self.root is not None and self._buf is not None, "direct readers have a folder and a buffer"
        try:
            with open(os.path.join(self.root, key), "rb", buffering=0) as f:
                got = f.readinto(self._buf)
                if got != size + _CRC_BYTES or f.read(1):
                    return False
        except OSError:
            return False
        view = np.frombuffer(self._buf, np.uint8)  # google_crc32c takes numpy arrays, not memoryviews
        if self.records:  # the record's CRC-32 covers the chunk's bytes and its crc32c: no need to check both
            rkey = record_key(key)
            if rkey is None:  # not a chunk key: let the store read it
                return False
            try:
                with open(os.path.join(self.root, rkey), "rb") as f:
                    return record_accepts(f.read(), view)
            except FileNotFoundError:
                if self.strict:
                    return False
            except OSError:
                return False
        # no records (or a store made before them): the crc32c is all there is
        return google_crc32c.value(view[:size]) == int.from_bytes(view[size:].tobytes(), "little")

    def _zarr_read(self, selection: tuple, out: np.ndarray) -> None:
        from zarr.core.buffer import default_buffer_prototype

        self.array.get_basic_selection(selection, out=default_buffer_prototype().nd_buffer.from_numpy_array(out))


def region_reader(array: zarr.Array) -> RegionReader:
    """The fastest reader of ``array``'s 2-D regions (see the module docstring).

    Direct (chunk files) exactly when the array is Zarr v3 in a local folder (through a
    :class:`~prismoe_store.stores.verified.VerifiedStore` or not), of two axes or more (chunks of 1 along
    all but the last two), with a regular chunk grid, the default
    chunk key encoding, no sharding, and the codecs ``bytes`` (little-endian) then ``crc32c`` and
    nothing else.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec
    from zarr.storage import LocalStore

    meta, store = array.metadata, array.store_path.store
    inner = store.inner if isinstance(store, VerifiedStore) else store
    codecs: tuple = tuple(getattr(meta, "codecs", ()))
    ok = (getattr(meta, "zarr_format", 2) == 3 and isinstance(inner, LocalStore) and len(array.shape) >= 2
          and all(c == 1 for c in array.chunks[:-2])
          and array.shards is None and len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
          and isinstance(codecs[1], Crc32cCodec) and type(meta.chunk_key_encoding).__name__ == "DefaultChunkKeyEncoding"
          and sys.byteorder == "little" and array.dtype.byteorder in ("=", "<", "|")
          and (codecs[0].endian is None or codecs[0].endian.value == "little"))
    if not ok:
        return RegionReader(array, None, False)
    verified = isinstance(store, VerifiedStore)
    return RegionReader(array, str(inner.root), True, records=verified, strict=verified and store.strict)
