"""The verified chunk store: every chunk a store writes gets a record, every chunk it reads is checked.

Every store is opened through :class:`VerifiedStore`, which keeps a *chunk record* beside each
chunk it writes (``<array>/_crc/<i>/<j>``: CRC-32 and size of the encoded bytes) and checks each
chunk it reads against it: a chunk that is missing, truncated, or holds
another chunk's bytes (a swapped tile) raises :class:`~prismoe_store.errors.CorruptStoreError`
in every reader, never zeros. Stores created with records say so in their format attribute
(``"chunk_records": true``); in them a chunk without a record is refused too.

Because Zarr reads a missing chunk as zeros, readers also check that the stored objects under a
region exist (:func:`check_stored`), and turn Zarr's checksum and decoding failures into
:class:`~prismoe_store.errors.CorruptStoreError` (:func:`reading`).

>>> record_key("pipe1/tiles/c/0/3")
'pipe1/tiles/_crc/0/3'
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import struct
from collections.abc import AsyncGenerator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore
from zlib_ng import zlib_ng

from prismoe_store.errors import CorruptStoreError

_CHUNK_KEY = re.compile(r"^(?P<array>(?:.*/)?)c(?P<index>(?:/\d+)*)$")
RECORD_DIR = "_crc"  # beside each array's c/ folder: one record per chunk, same index path
_RETRY_WAITS = (0.01, 0.05, 0.2, None)  # seconds between re-reads of a chunk that disagrees with its record
_ENTRY = struct.Struct("<IQ")  # one state a chunk may be in: CRC-32 of its encoded bytes, and their size
_MAX_RECORDS = 1 << 20  # chunk records a store remembers (about 100 MiB at most)
_ABSENT = (0, 2**64 - 1)  # the state "no chunk" (a chunk being created for the first time)


def record_key(key: str) -> str | None:
    """The chunk record of chunk ``key`` (``None`` when ``key`` is no chunk, or a progress flag).

    >>> record_key("pipe1/tiles/c/0/3"), record_key("pipe1/tiles/zarr.json")
    ('pipe1/tiles/_crc/0/3', None)
    """
    m = _CHUNK_KEY.match(key)
    if m is None or key.startswith("_progress/"):
        return None
    return f"{m['array']}{RECORD_DIR}{m['index'] or '/_'}"


def _entry_of(data) -> tuple[int, int]:
    # zlib's CRC-32, not crc32c: a chunk ends with its own crc32c, and the crc32c of data followed by
    # its crc32c is the same constant for every chunk (so it could not tell two chunks apart). zlib-ng
    # computes the same CRC-32 ~4x faster than zlib (it is on every chunk read and written)
    view = np.asarray(data, dtype=np.uint8).reshape(-1)
    return zlib_ng.crc32(view.data), int(view.size)


def _pack(entries: Iterable[tuple[int, int]]) -> Buffer:
    return default_buffer_prototype().buffer.from_bytes(b"".join(_ENTRY.pack(*e) for e in dict.fromkeys(entries)))


def record_accepts(record: bytes, data) -> bool:
    """Whether a chunk record (the bytes stored at :func:`record_key`) accepts a chunk's encoded
    bytes ``data`` (for readers that read chunk files themselves; anything else: read it through
    the store, which says what is wrong).

    >>> data = np.frombuffer(b"abc", np.uint8)
    >>> record_accepts(_ENTRY.pack(*_entry_of(data)), b"abc"), record_accepts(b"", b"abc")
    (True, False)
    """
    if not record or len(record) % _ENTRY.size:
        return False
    entry = _entry_of(np.frombuffer(data, np.uint8))
    return any(_ENTRY.unpack_from(record, i) == entry for i in range(0, len(record), _ENTRY.size))


def _unpack(rec: Buffer, key: str, where) -> list[tuple[int, int]]:
    raw = rec.to_bytes()
    if not raw or len(raw) % _ENTRY.size:
        raise CorruptStoreError(f"the record of chunk {key} of {where} is damaged")
    return [_ENTRY.unpack_from(raw, i) for i in range(0, len(raw), _ENTRY.size)]


class VerifiedStore(WrapperStore):
    """A Zarr store that records every chunk it writes and checks every chunk it reads.

    On write, ``<array>/_crc/<index>`` gets the CRC-32 and size of the encoded chunk (see
    :meth:`set` for the order that keeps them in agreement whenever a writer is killed). On read,
    a chunk with a record must exist and match it (CRC and size; a shard is checked whole the first
    time its index is read, then its inner chunks are read by range); with ``strict`` (stores made
    with records) a chunk without a record is refused as well. Failures raise :class:`CorruptStoreError`
    naming the chunk.

    >>> from zarr.storage import MemoryStore
    >>> s = VerifiedStore(MemoryStore())
    >>> a = zarr.create_array(s, shape=(4,), chunks=(2,), dtype="f4", fill_value=0)
    >>> a[:] = 1
    >>> import asyncio; _ = asyncio.run(s._store.delete("c/1"))
    >>> a[:]
    Traceback (most recent call last):
    ...
    prismoe_store.errors.CorruptStoreError: chunk c/1 of memory store is missing (the store recorded writing it)
    """

    def __init__(self, store: Store, *, strict: bool = False) -> None:
        super().__init__(store)
        self.strict = strict  # refuse chunks that have no record (stores created with records)
        self._verified: set[str] = set()  # shards checked whole since this store was opened
        self._records: dict[str, list[tuple[int, int]]] = {}  # chunk records read so far (a chunk that
        # disagrees with its remembered record is checked against the stored record again)

    @property
    def inner(self) -> Store:
        """The wrapped store (chunk files and records as they are stored)."""
        return self._store

    def _with_store(self, store: Store) -> VerifiedStore:
        return type(self)(store, strict=self.strict)

    def __str__(self) -> str:
        return str(getattr(self._store, "root", None) or getattr(self._store, "path", None) or "memory store")

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
                  ) -> Buffer | None:
        rkey = record_key(key)
        if rkey is None:
            return await self._store.get(key, prototype, byte_range)
        for wait in _RETRY_WAITS:  # a chunk being rewritten (an append filling it) is briefly newer than its record
            try:
                return await self._checked(key, rkey, prototype, byte_range)
            except CorruptStoreError:
                if wait is None:
                    raise
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _checked(self, key: str, rkey: str, prototype: BufferPrototype, byte_range: ByteRequest | None
                       ) -> Buffer | None:
        known = self._records.get(rkey)
        if known is not None and byte_range is None:  # record read before: one read, and a CRC of it
            value = await self._store.get(key, prototype)
            if value is not None and _entry_of(value.as_numpy_array()) in known:
                return value
        value, rec = await asyncio.gather(self._store.get(key, prototype, byte_range),
                                          self._store.get(rkey, default_buffer_prototype()))
        if rec is None:
            if value is not None and self.strict:
                raise CorruptStoreError(f"chunk {key} of {self} has no record of being written (a stray chunk)")
            return value
        entries = _unpack(rec, key, self)
        if len(self._records) >= _MAX_RECORDS:
            self._records.clear()
        self._records[rkey] = entries
        if value is None:
            if _ABSENT in entries:  # its first write was cut short: it was never there
                return None
            raise CorruptStoreError(f"chunk {key} of {self} is missing (the store recorded writing it)")
        if byte_range is None:
            data = value.as_numpy_array()
            if _entry_of(data) not in entries:
                sizes = " or ".join(str(n) for _, n in entries if (0, n) != _ABSENT)
                raise CorruptStoreError(f"chunk {key} of {self} does not hold what was written there "
                                        f"({data.size} bytes, {sizes} recorded; truncated, damaged or another "
                                        "chunk's data)")
        elif isinstance(byte_range, SuffixByteRequest) and key not in self._verified:
            # a shard's index is read first: check the whole shard once (its index alone cannot tell two
            # shards apart whose inner chunks have the same sizes), then trust it while this store is open
            await self._checked(key, rkey, prototype, None)
            self._verified.add(key)
        return value

    async def getsize(self, key: str) -> int:
        return await self._store.getsize(key)  # sizes only: metadata reports read no chunk

    async def getsize_prefix(self, prefix: str) -> int:
        return await self._store.getsize_prefix(prefix)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key: str, value: Buffer) -> None:
        """Write a chunk so that a kill at any moment leaves chunk and record in agreement: the record
        first accepts both the old and the new chunk, then the chunk is written, then the record
        names the new chunk alone (each object write is atomic in Zarr's local and fsspec stores)."""
        self._verified.discard(key)
        rkey = record_key(key)
        if rkey is None:
            await self._store.set(key, value)
            return
        new = _entry_of(value.as_numpy_array())
        old = await self._store.get(rkey, default_buffer_prototype())
        try:
            before = _unpack(old, key, self) if old is not None else [_ABSENT]
        except CorruptStoreError:
            before = []  # a damaged record is replaced
        if before != [new]:
            await self._store.set(rkey, _pack([*before, new]))
        await self._store.set(key, value)
        if before != [new]:
            await self._store.set(rkey, _pack([new]))
        self._records[rkey] = [new]

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        self._verified.discard(key)
        rkey = record_key(key)
        if rkey is not None:
            self._records.pop(rkey, None)
            await self._store.delete(rkey)
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        """Delete everything under ``prefix`` (chunks and their records); in a local folder the files
        are unlinked by several threads (on a disk mounted with ``discard`` each unlink of a file
        already written back waits for the device: ~2 ms a file, 0.4 s for a fit's scratch)."""
        under = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self._verified = {k for k in self._verified if not k.startswith(under)}
        self._records = {k: v for k, v in self._records.items() if not k.startswith(under)}
        if not isinstance(self._store, LocalStore):
            await self._store.delete_dir(prefix)
            return
        self._check_writable()
        await asyncio.to_thread(_remove_tree, os.path.join(str(self._store.root), prefix))

    async def check_chunk(self, key: str) -> bool:
        """True when chunk ``key`` exists and matches its record (reads the chunk)."""
        try:
            return await self.get(key, default_buffer_prototype()) is not None
        except CorruptStoreError:
            return False


def _remove_tree(path: str, threads: int = 8) -> None:
    """``shutil.rmtree(path)`` with the files unlinked by ``threads`` threads (their waits overlap)."""
    if not os.path.isdir(path):
        return
    files, dirs = [], []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names]
        dirs.append(root)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(_unlink, files))
    for d in reversed(dirs):  # children before parents
        shutil.rmtree(d, ignore_errors=True)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def damaged_chunks(array: zarr.Array, coords: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Of the stored objects (chunks, or shards when sharded) at ``coords``, those that are missing,
    unrecorded or do not match their record (each is read once; for resuming jobs)."""
    from zarr.core.sync import sync

    store = array.store_path.store
    if not isinstance(store, VerifiedStore):
        return []
    prefix = array.store_path.path
    coords = list(coords)

    async def check_all() -> list[bool]:
        keys = ["/".join(filter(None, (prefix, array.metadata.encode_chunk_key(c)))) for c in coords]
        return list(await asyncio.gather(*(store.check_chunk(k) for k in keys)))

    return [c for c, ok in zip(coords, sync(check_all()), strict=True) if not ok]


@contextmanager
def reading(what: str, advice: str | None = None) -> Iterator[None]:
    """Turn Zarr's checksum/decoding failures into :class:`CorruptStoreError`; ``advice`` (what repairs
    it, e.g. the command that writes it again) is added to every such error raised inside.

    >>> try:
    ...     with reading("x", advice="write it again"):
    ...         raise CorruptStoreError("chunk c/0 of s is missing")
    ... except CorruptStoreError as e:
    ...     print(e)
    chunk c/0 of s is missing: write it again
    """
    tail = f": {advice}" if advice else ""
    try:
        yield
    except CorruptStoreError as e:
        if not advice:
            raise
        raise CorruptStoreError(f"{e}{tail}") from None
    except (ValueError, RuntimeError, EOFError) as e:
        msg = str(e)
        if "checksum" in msg.lower() or "decompress" in msg.lower() or "zstd" in msg.lower() or "blosc" in msg.lower():
            raise CorruptStoreError(f"corrupt chunk in {what}: {msg}{tail}") from None
        raise CorruptStoreError(f"cannot decode {what}: {msg}{tail}") from None



def check_stored(array: zarr.Array, rows: slice, cols: slice, what: str) -> None:
    """Raise :class:`CorruptStoreError` when a stored object (chunk, or shard when sharded) under the
    region ``rows × cols`` of a 2-D array is missing or empty. Zarr would read those as zeros; the
    writers here write every chunk (``write_empty_chunks``), so absence means damage."""
    from zarr.core.sync import sync

    step_r, step_c = array.shards or array.chunks
    store, prefix = array.store_path.store, array.store_path.path
    for i in range(rows.start // step_r, -(-rows.stop // step_r)):
        for j in range(cols.start // step_c, -(-cols.stop // step_c)):
            key = "/".join(filter(None, (prefix, array.metadata.encode_chunk_key((i, j)))))
            try:
                size = sync(store.getsize(key))
            except (FileNotFoundError, KeyError):
                size = 0
            if not size:
                raise CorruptStoreError(f"{what}: stored chunk {key} is missing or empty")



def finite(values: np.ndarray, what: str) -> np.ndarray:
    """``values``, or :class:`CorruptStoreError` when they hold NaN/Inf (no writer stores those).

    >>> finite(np.ones(2), "x").tolist()
    [1.0, 1.0]
    """
    if not np.isfinite(values).all():
        raise CorruptStoreError(f"{what} holds NaN or Inf")
    return values
