"""Zarr v3 store machinery shared by the weights, pairs and adapter stores, and the weights store.

Every prismoe store is a Zarr v3 group whose attributes carry ``{"prismoe_store": {"format":
NAME, "version": N}}`` so a reader refuses what it does not understand. Chunks carry a crc32c
checksum (a corrupt chunk raises :class:`~prismoe_store.errors.CorruptStoreError`), and an
optional compressor. Because Zarr reads a missing chunk as zeros, finished work is recorded in
the store's own *progress record* (one tiny chunk per unit, so concurrent writers never share a
chunk), never inferred from chunk presence.

Every store is opened through :class:`VerifiedStore`, which keeps a *chunk record* beside each
chunk it writes (``<array>/_crc/<i>/<j>``: CRC-32 and size of the encoded bytes) and checks each
chunk it reads against it: a chunk that is missing, truncated, or holds
another chunk's bytes (a swapped tile) raises :class:`~prismoe_store.errors.CorruptStoreError`
in every reader, never zeros. Stores created with records say so in their format attribute
(``"chunk_records": true``); in them a chunk without a record is refused too.

Outputs are checked before anything is written (:func:`create_checked`): an empty path, an unknown
or read-only protocol, or an existing path that is not a store of the expected kind is refused
(``overwrite`` replaces only a store of that kind); ``file://`` URLs are local paths.

>>> import numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores import WeightsStore
>>> w = np.arange(48, dtype=np.float32).reshape(8, 6)
>>> store = WeightsStore.create("memory://doc-weights", overwrite=True)
>>> store.write_matrix("lm_head.weight", w, plan_grid(6, 8, 4))
>>> bool((WeightsStore.open("memory://doc-weights").read("lm_head.weight") == w).all())
True
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import re
import struct
import threading
import zlib
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store, SuffixByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .errors import (
    CorruptStoreError,
    IncompleteStoreError,
    StoreError,
    StoreFormatError,
    TensorNotFoundError,
)
from .grid import GridSpec

FORMAT_KEY = "prismoe_store"
Compressor = Literal["none", "zstd", "blosc"]


@dataclass(frozen=True)
class StoreOptions:
    """How chunks are encoded and where the store lives.

    >>> StoreOptions(compressor="blosc").codecs()[-1]
    Crc32cCodec()
    """

    compressor: Compressor = "zstd"  # codec applied to every chunk before its checksum
    level: int = 3  # compression level (zstd 1..22, blosc 1..9); ignored for "none"
    shard: bool = False  # pack one band of tiles into one Zarr shard (for very many small tiles)
    storage_options: dict[str, Any] | None = field(default=None, hash=False)  # fsspec options for URLs

    def __post_init__(self) -> None:
        if self.compressor not in ("none", "zstd", "blosc"):
            raise StoreError(f"compressor must be none, zstd or blosc, got {self.compressor!r}")
        if not isinstance(self.level, int) or not 0 <= self.level <= 22:
            raise StoreError(f"compression level must be an integer 0..22, got {self.level!r}")

    def codecs(self) -> list:
        """The bytes-to-bytes codec chain: optional compressor, then crc32c."""
        if self.compressor == "zstd":
            return [ZstdCodec(level=self.level), Crc32cCodec()]
        if self.compressor == "blosc":
            return [BloscCodec(cname="zstd", clevel=min(self.level, 9), shuffle="shuffle"), Crc32cCodec()]
        return [Crc32cCodec()]


# -- opening and format checks ---------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in str(path)


READ_ONLY_PROTOCOLS = ("http", "https", "reference", "github", "zip", "tar", "libarchive")


def location(url: str | os.PathLike, *, write: bool = False) -> str:
    """The path or URL a store lives at, checked before anything is read or written.

    ``file://`` URLs become local paths; an empty path, an unknown protocol, a protocol whose
    fsspec backend is not installed, or (``write=True``) a read-only protocol raise
    :class:`StoreError` naming the cause.

    >>> location("file:///tmp/x.zarr"), location("memory://a")
    ('/tmp/x.zarr', 'memory://a')
    >>> location("bogus://x")
    Traceback (most recent call last):
    ...
    prismoe_store.errors.StoreError: bogus://x: unknown protocol 'bogus' (not a path, and no fsspec filesystem of that name)
    """
    url = os.fspath(url) if isinstance(url, os.PathLike) else url
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"a store path must be a non-empty path or URL, got {url!r}")
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path:
            raise StoreError(f"{url} names no path")
        return path
    if not _is_url(url):
        return url
    protocol = url.split("://", 1)[0].split("::")[-1]
    if write and protocol in READ_ONLY_PROTOCOLS:
        raise StoreError(f"{url}: {protocol}:// is read-only here, a store cannot be written to it")
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise StoreError(f"{url}: the {protocol}:// filesystem needs a package that is not installed "
                         f"({str(e).splitlines()[0]})") from None
    except ValueError:
        raise StoreError(f"{url}: unknown protocol {protocol!r} (not a path, and no fsspec filesystem of that name)"
                         ) from None
    return url


def is_persistent(url: str) -> bool:
    """False for ``memory://`` stores, which live only as long as the process that made them."""
    return not str(url).startswith("memory://")


def _make_store(url: str, mode: str, storage_options: dict | None) -> VerifiedStore:
    read_only = mode == "r"
    try:
        if _is_url(url):
            inner: Store = FsspecStore.from_url(url, storage_options=storage_options or None, read_only=read_only)
        else:
            inner = LocalStore(url, read_only=read_only)
    except (ImportError, ValueError, TypeError, OSError) as e:
        raise StoreError(f"cannot open store {url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return VerifiedStore(inner)


def open_root(url: str | os.PathLike, mode: str = "r", *, storage_options: dict | None = None) -> zarr.Group:
    """Open the Zarr v3 group at a local path or fsspec URL; a clear error when there is none.

    The group reads and writes through :class:`VerifiedStore` (chunk records kept and checked).
    """
    url = location(url, write=mode != "r")
    if mode == "r" and not _is_url(url) and not os.path.exists(url):
        raise StoreError(f"no store at {url}")
    store = _make_store(url, mode, storage_options)
    try:
        group = zarr.open_group(store, mode=mode, zarr_format=3 if mode in ("w", "w-") else None)
    except FileNotFoundError:
        raise StoreError(f"no store at {url}") from None
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise StoreError(f"cannot open store {url}: {_one_line(e)}") from None
    tag = group.attrs.get(FORMAT_KEY)
    store.strict = isinstance(tag, dict) and bool(tag.get("chunk_records"))
    return group


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def format_attrs(name: str, version: int) -> dict:
    """The attribute that names a store's format and version (and that it keeps chunk records)."""
    return {FORMAT_KEY: {"format": name, "version": version, "chunk_records": True}}


def check_format(group: zarr.Group, name: str, version: int, url: str = "") -> None:
    """Raise :class:`StoreFormatError` unless ``group`` is a ``name`` store of ``version``."""
    where = f" at {url}" if url else ""
    if getattr(group.metadata, "zarr_format", 3) != 3:
        raise StoreFormatError(f"store{where} is Zarr v{group.metadata.zarr_format}, expected Zarr v3")
    tag = group.attrs.get(FORMAT_KEY)
    if not isinstance(tag, dict):
        raise StoreFormatError(f"store{where} is not a prismoe store (no {FORMAT_KEY!r} attribute)")
    if tag.get("format") != name:
        raise StoreFormatError(f"store{where} is a {tag.get('format')!r} store, expected {name!r}")
    if tag.get("version") != version:
        raise StoreFormatError(
            f"store{where} is {name} format version {tag.get('version')}, this library reads version {version}"
        )


def open_checked(url, name: str, version: int, mode: str = "r", *, storage_options=None) -> zarr.Group:
    """:func:`open_root` then :func:`check_format`; a writable open of anything that is not already a
    ``name`` store is refused before Zarr writes into it."""
    if mode != "r":
        kind = existing_kind(url, storage_options=storage_options)
        if kind is None:
            raise StoreError(f"no store at {location(url)}")
        if kind != name and kind in ("file", "folder", "zarr", "unreadable"):
            raise StoreFormatError(f"{location(url)} holds {_describe(kind)}, not {_a(name)} store")
    group = open_root(url, mode, storage_options=storage_options)
    check_format(group, name, version, str(url))
    return group


def create_checked(url, name: str, version: int, *, overwrite: bool = False, attrs: dict | None = None,
                   storage_options=None) -> zarr.Group:
    """Create a new store of format ``name``.

    Refuses (:class:`StoreError`, before anything is written) an empty or odd URL, and anything
    already at ``url`` that is not a ``name`` store (a file, a folder of other files, another kind
    of store) even with ``overwrite``; an existing ``name`` store is replaced only with ``overwrite``.
    """
    url = location(url, write=True)
    found = existing_kind(url, storage_options=storage_options)
    if found is not None:
        if found != name:
            raise StoreFormatError(f"{url} holds {_describe(found)}, not {_a(name)} store: refusing to replace it "
                                   f"(--overwrite replaces only {_a(name)} store); choose another output")
        if not overwrite:
            raise StoreError(f"{url} already exists (pass overwrite=True / --overwrite to replace it)")
    group = open_root(url, "w", storage_options=storage_options)
    group.attrs.update({**format_attrs(name, version), **(attrs or {})})
    group.store.strict = True
    return group


def existing_kind(url: str, *, storage_options: dict | None = None) -> str | None:
    """What is at ``url``: ``None`` (nothing, or an empty folder), the format name of a prismoe store
    (``"weights"``, ``"pairs"``, ``"adapter"``), or ``"file"``, ``"folder"``, ``"zarr"`` (a Zarr
    group that is no prismoe store) or ``"unreadable"`` (a ``zarr.json`` that does not parse).

    >>> import tempfile
    >>> existing_kind(tempfile.mkdtemp()) is None
    True
    """
    url = location(url)
    if _is_url(url):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            if not fs.exists(path):
                return None
            if fs.isfile(path):
                return "file"
            if not fs.ls(path, detail=False):
                return None
            meta = fs.cat_file(path.rstrip("/") + "/zarr.json") if fs.exists(path.rstrip("/") + "/zarr.json") else None
        except (OSError, ValueError, ImportError) as e:
            raise StoreError(f"cannot look at {url}: {_one_line(e)}") from None
    else:
        if not os.path.lexists(url):
            return None
        if not os.path.isdir(url):
            return "file"
        if not os.listdir(url):
            return None
        meta_path = Path(url, "zarr.json")
        meta = meta_path.read_bytes() if meta_path.is_file() else None
    if meta is None:
        return "folder"
    try:
        tag = json.loads(meta).get("attributes", {}).get(FORMAT_KEY)
    except (ValueError, AttributeError):
        return "unreadable"
    return str(tag["format"]) if isinstance(tag, dict) and "format" in tag else "zarr"


def _a(name: str) -> str:
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _describe(kind: str) -> str:
    return {"file": "a file", "folder": "a folder of other files", "zarr": "a Zarr store that is no prismoe store",
            "unreadable": "a store whose zarr.json cannot be read"}.get(kind, f"{_a(kind)} store")


# -- chunk records -----------------------------------------------------------------------------

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
    # its crc32c is the same constant for every chunk (so it could not tell two chunks apart)
    view = np.asarray(data, dtype=np.uint8).reshape(-1)
    return zlib.crc32(view), int(view.size)


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
    with records) a chunk without a record is refused as well. Failures raise :class:`CorruptStoreError` naming the chunk.

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

    async def check_chunk(self, key: str) -> bool:
        """True when chunk ``key`` exists and matches its record (reads the chunk)."""
        try:
            return await self.get(key, default_buffer_prototype()) is not None
        except CorruptStoreError:
            return False


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

    return [c for c, ok in zip(coords, sync(check_all())) if not ok]


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn Zarr's checksum/decoding failures into :class:`CorruptStoreError`."""
    try:
        yield
    except (ValueError, RuntimeError, EOFError) as e:
        msg = str(e)
        if "checksum" in msg.lower() or "decompress" in msg.lower() or "zstd" in msg.lower() or "blosc" in msg.lower():
            raise CorruptStoreError(f"corrupt chunk in {what}: {msg}") from None
        raise CorruptStoreError(f"cannot decode {what}: {msg}") from None


def create_chunked(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype,
                   options: StoreOptions, *, shards: tuple[int, ...] | None = None,
                   attrs: dict | None = None, overwrite: bool = False) -> zarr.Array:
    """Create an array with the options' codecs (and shards) and fill value 0."""
    try:
        return group.create_array(
            name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0,
            compressors=options.codecs(), attributes=attrs or {}, overwrite=overwrite,
            config={"write_empty_chunks": True},  # every written chunk exists, so a missing one is damage
        )
    except (ValueError, TypeError) as e:
        raise StoreError(f"cannot create array {name!r}: {e}") from None


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


# -- the progress record ---------------------------------------------------------------------


class Progress:
    """Done-flags for ``units`` units of work, one single-byte chunk each (safe for concurrent writers).

    >>> g = zarr.open_group("memory://doc-progress", mode="w")
    >>> p = Progress.create(g, "tiles", 4)
    >>> p.mark(2); p.done()
    [2]
    """

    def __init__(self, array: zarr.Array):
        self._array = array

    @classmethod
    def create(cls, group: zarr.Group, name: str, units: int) -> Progress:
        """Create (or reuse, when it already has ``units`` units) the record ``_progress/name``."""
        path = f"_progress/{name}"
        if path in group:
            arr = group[path]
            if arr.shape != (units,):
                raise StoreError(f"progress record {name!r} has {arr.shape[0]} units, expected {units}")
            return cls(arr)
        arr = group.create_array(path, shape=(units,), chunks=(1,), dtype="uint8", fill_value=0,
                                 compressors=[Crc32cCodec()])
        return cls(arr)

    @classmethod
    def open(cls, group: zarr.Group, name: str) -> Progress | None:
        """The record ``name``, or ``None`` when the store has none."""
        path = f"_progress/{name}"
        return cls(group[path]) if path in group else None

    @property
    def units(self) -> int:
        """Number of units the record tracks."""
        return self._array.shape[0]

    def mark(self, unit: int) -> None:
        """Record ``unit`` as finished (call only after its data is written)."""
        self._array[unit] = 1

    def mark_many(self, units) -> None:
        """Record several units as finished in one Zarr call (their chunks are written concurrently)."""
        units = np.asarray(sorted(set(int(u) for u in units)), dtype=np.int64)
        if units.size == 0:
            return
        if units[-1] - units[0] + 1 == units.size:  # a contiguous run: one slice write
            self._array[int(units[0]):int(units[-1]) + 1] = 1
        else:
            self._array.set_coordinate_selection(units, 1)

    def unmark(self, units) -> None:
        """Record ``units`` as not finished (their data was found damaged: the job redoes them)."""
        for u in sorted({int(u) for u in units}):
            self._array[u] = 0

    def done(self) -> list[int]:
        """Finished units, ascending."""
        with reading("progress record"):
            return [int(i) for i in np.flatnonzero(self._array[:])]

    def missing(self) -> list[int]:
        """Unfinished units, ascending."""
        with reading("progress record"):
            return [int(i) for i in np.flatnonzero(self._array[:] == 0)]

    def complete(self) -> bool:
        """True when every unit is finished."""
        return not self.missing()


# -- the weights store -----------------------------------------------------------------------

WEIGHTS_FORMAT, WEIGHTS_VERSION = "weights", 1


def _key(tensor: str) -> str:
    return "tensors/" + tensor.replace("%", "%25").replace("/", "%2F")


class TensorWriter:
    """Writes one tensor of a weights store tile by tile (or band by band when sharded), resumably."""

    def __init__(self, array: zarr.Array, grid: GridSpec, progress: Progress, sharded: bool):
        self.array = array  # the tensor's Zarr array, shape (d_out, d_in), one chunk per tile
        self.grid = grid  # the tile grid the array is chunked on
        self.progress = progress  # per-tile (or per-band when sharded) done flags
        self.sharded = sharded  # True: units are bands (one shard each); False: units are tiles

    @property
    def unit(self) -> Literal["tile", "band"]:
        """What one unit of the progress record is."""
        return "band" if self.sharded else "tile"

    def missing(self) -> list[int]:
        """Units (tiles or bands) not yet written."""
        return self.progress.missing()

    def write_tile(self, worker: int, data: np.ndarray) -> None:
        """Write one tile (clipped to the true matrix) and mark it done. Not for sharded stores."""
        if self.sharded:
            raise StoreError("this store is sharded: write whole bands with write_band()")
        rows, cols = self.grid.valid_region(worker)
        if rows.stop > rows.start and cols.stop > cols.start:
            self.array[rows, cols] = data[: rows.stop - rows.start, : cols.stop - cols.start]
        self.progress.mark(worker)

    def write_band(self, row: int, data: np.ndarray) -> None:
        """Write output band ``row`` (all its tiles, shape ``(<=tile_out, d_in)``) and mark it done."""
        start = row * self.grid.tile_out
        stop = min(start + self.grid.tile_out, self.grid.d_out)
        if stop > start:
            self.array[start:stop, :] = data[: stop - start, : self.grid.d_in]
        if self.sharded:
            self.progress.mark(row)
        else:
            self.progress.mark_many(range(row * self.grid.cols, (row + 1) * self.grid.cols))

    def finish(self) -> None:
        """Mark the tensor complete (metadata last); raises if units are still missing."""
        missing = self.missing()
        if missing:
            raise IncompleteStoreError(f"{len(missing)} {self.unit}s of {self.array.name} are not written yet")
        self.array.attrs["complete"] = True


class WeightsStore:
    """A store of extracted weight matrices, each chunked one tile per chunk on its grid."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group  # the root Zarr group
        self.url = url  # where the store lives

    # -- open / create --
    @classmethod
    def create(cls, url, *, options: StoreOptions | None = None, overwrite: bool = False) -> WeightsStore:
        """Create an empty weights store (or open an existing one to add/resume tensors).

        Resuming keeps the store's own encoding options (``options`` apply to a new store only), so
        a second run never changes how the first one's chunks are read.
        """
        options = options or StoreOptions()
        url = location(url, write=True)
        asked = {"compressor": options.compressor, "level": options.level, "shard": options.shard}
        if not overwrite and existing_kind(url, storage_options=options.storage_options) == WEIGHTS_FORMAT:
            group = open_checked(url, WEIGHTS_FORMAT, WEIGHTS_VERSION, "a", storage_options=options.storage_options)
            if group.attrs.get("options") is None:
                group.attrs["options"] = asked
            return cls(group, url)
        group = create_checked(url, WEIGHTS_FORMAT, WEIGHTS_VERSION, overwrite=True,
                               storage_options=options.storage_options, attrs={"options": asked})
        return cls(group, url)

    @classmethod
    def open(cls, url, mode: str = "r", *, storage_options: dict | None = None) -> WeightsStore:
        """Open an existing weights store (format and version checked)."""
        return cls(open_checked(url, WEIGHTS_FORMAT, WEIGHTS_VERSION, mode, storage_options=storage_options), str(url))

    @property
    def options(self) -> StoreOptions:
        """The encoding options the store was created with."""
        return StoreOptions(**self.group.attrs.get("options", {}))

    # -- listing --
    def tensors(self, *, include_incomplete: bool = False) -> list[str]:
        """Names of the tensors in the store (complete ones unless asked)."""
        if "tensors" not in self.group:
            return []
        out = []
        for _, arr in sorted(self.group["tensors"].arrays()):
            if include_incomplete or arr.attrs.get("complete"):
                out.append(arr.attrs["tensor"])
        return out

    def _array(self, tensor: str, *, require_complete: bool = True) -> zarr.Array:
        key = _key(tensor)
        if key not in self.group:
            have = ", ".join(self.tensors(include_incomplete=True)) or "none"
            raise TensorNotFoundError(f"tensor {tensor!r} is not in {self.url} (it has: {have})")
        arr = self.group[key]
        if require_complete and not arr.attrs.get("complete"):
            raise IncompleteStoreError(f"tensor {tensor!r} in {self.url} is incomplete: re-run the extraction")
        return arr

    def info(self, tensor: str) -> dict:
        """The tensor's attributes: source, tensor name, source dtype/shape, grid, complete."""
        return dict(self._array(tensor, require_complete=False).attrs)

    def grid(self, tensor: str) -> GridSpec:
        """The tile grid a tensor is chunked on."""
        return GridSpec.from_dict(self.info(tensor)["grid"])

    # -- writing --
    def begin(self, tensor: str, grid: GridSpec, *, dtype="float32", source: dict | None = None) -> TensorWriter:
        """Start (or resume) writing ``tensor`` of shape ``(grid.d_out, grid.d_in)``.

        Resuming checks that the existing array has the same grid, dtype and source; finished
        units are kept and :meth:`TensorWriter.missing` lists what is left.
        """
        key = _key(tensor)
        options = self.options
        attrs = {"tensor": tensor, "grid": grid.to_dict(), "dtype": str(np.dtype(dtype)), "complete": False,
                 **(source or {})}
        if key in self.group:
            arr = self.group[key]
            old = dict(arr.attrs)
            for k in ("grid", "dtype"):
                if old.get(k) != attrs[k]:
                    raise StoreError(
                        f"{tensor!r} already in {self.url} with {k}={old.get(k)}, asked {attrs[k]}: "
                        "use another store or --overwrite"
                    )
        else:
            shards = (grid.tile_out, grid.d_in_pad) if options.shard else None
            arr = create_chunked(self.group, key, (grid.d_out, grid.d_in), grid.tile_shape, dtype, options,
                                 shards=shards, attrs=attrs)
        arr = arr.with_config({"write_empty_chunks": True})  # runtime config: not persisted, so set on resume too
        sharded = arr.shards is not None  # a resumed tensor keeps its layout, whatever the options now
        units = grid.rows if sharded else grid.workers
        progress = Progress.create(self.group, key.replace("/", "."), units)
        _recheck_done(arr, grid, progress, sharded)
        return TensorWriter(arr, grid, progress, sharded)

    def write_matrix(self, tensor: str, matrix: np.ndarray, grid: GridSpec, *, source: dict | None = None) -> None:
        """Write an in-memory matrix whole (small matrices, tests); see :mod:`extract` for streaming."""
        matrix = np.asarray(matrix)
        if matrix.shape != (grid.d_out, grid.d_in):
            raise StoreError(f"matrix shape {matrix.shape} does not match grid {grid.d_out}×{grid.d_in}")
        w = self.begin(tensor, grid, dtype=matrix.dtype, source=source)
        for r in range(grid.rows):
            w.write_band(r, matrix[r * grid.tile_out:(r + 1) * grid.tile_out])
        w.finish()

    def write_bias(self, tensor: str, values: np.ndarray) -> None:
        """Store the bias added to ``tensor``'s outputs (``[d_out]``, float32), e.g. ``lm_head.bias``.

        Call before :meth:`TensorWriter.finish`: a tensor is complete only with its bias.
        """
        arr = self._array(tensor, require_complete=False)
        values = np.asarray(values, np.float32).reshape(-1)
        if values.shape != (arr.shape[0],):
            raise StoreError(f"a bias for {tensor!r} must have {arr.shape[0]} values, got {values.shape}")
        out = create_chunked(self.group, _key(tensor).replace("tensors/", "biases/", 1), values.shape, values.shape,
                             "float32", self.options, overwrite=True)
        out[:] = values

    def bias(self, tensor: str) -> np.ndarray | None:
        """The bias stored with ``tensor`` (``[d_out]`` float32), or ``None`` when its source had none."""
        arr = self._array(tensor)
        if not arr.attrs.get("source_bias"):
            return None
        key = _key(tensor).replace("tensors/", "biases/", 1)
        if key not in self.group:
            raise CorruptStoreError(f"{tensor!r} in {self.url} records a bias but {key} is missing")
        bias = self.group[key]
        from zarr.core.sync import sync

        chunk = "/".join(filter(None, (bias.store_path.path, bias.metadata.encode_chunk_key((0,)))))
        try:
            size = sync(bias.store_path.store.getsize(chunk))
        except (FileNotFoundError, KeyError):
            size = 0
        if not size:
            raise CorruptStoreError(f"the bias of {tensor!r} in {self.url} is missing its data")
        with reading(f"bias of {tensor!r} in {self.url}"):
            return bias[:]

    # -- reading --
    def array(self, tensor: str) -> zarr.Array:
        """The complete tensor's Zarr array (for Dask: ``dask.array.from_zarr``)."""
        return self._array(tensor)

    def read(self, tensor: str) -> np.ndarray:
        """The whole tensor in memory (small tensors)."""
        arr = self._array(tensor)
        check_stored(arr, slice(0, arr.shape[0]), slice(0, arr.shape[1]), f"{tensor!r} in {self.url}")
        with reading(f"{tensor!r} in {self.url}"):
            return arr[:]

    def read_tile(self, tensor: str, worker: int) -> np.ndarray:
        """Tile ``worker`` as a full ``(tile_out, tile_in)`` array, zero where it is padding."""
        arr = self._array(tensor)
        grid = GridSpec.from_dict(arr.attrs["grid"])
        rows, cols = grid.valid_region(worker)
        out = np.zeros(grid.tile_shape, dtype=arr.dtype)
        if rows.stop > rows.start and cols.stop > cols.start:
            check_stored(arr, rows, cols, f"tile {worker} of {tensor!r} in {self.url}")
            with reading(f"tile {worker} of {tensor!r} in {self.url}"):
                out[: rows.stop - rows.start, : cols.stop - cols.start] = arr[rows, cols]
        return out


def _recheck_done(arr: zarr.Array, grid: GridSpec, progress: Progress, sharded: bool) -> None:
    """Resuming trusts only finished units whose stored chunks still match their records: damaged
    ones (missing, torn, swapped) are marked unfinished, so the job writes them again."""
    done = progress.done()
    if sharded:
        coords = {u: (u, 0) for u in done if u * grid.tile_out < grid.d_out}
    else:
        coords = {}
        for u in done:
            rows, cols = grid.valid_region(u)
            if rows.stop > rows.start and cols.stop > cols.start:
                coords[u] = grid.row_col(u)
    bad = set(damaged_chunks(arr, coords.values()))
    if bad:
        progress.unmark(u for u, c in coords.items() if c in bad)
        arr.attrs["complete"] = False


def store_exists(url: str) -> bool:
    """True when something (a Zarr group or any file, or a non-empty folder) is already at ``url``."""
    return existing_kind(url) is not None


@contextmanager
def job_lock(url: str) -> Iterator[None]:
    """Hold the writer lock of the local store at ``url`` for one job (a hidden ``.NAME.lock`` file
    beside it); a second job on the same store fails at once with :class:`StoreError` instead of
    mixing its writes with the first one's. URLs get an in-process lock only.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with job_lock(os.path.join(d, "s.zarr")):
    ...     with job_lock(os.path.join(d, "s.zarr")):
    ...         pass
    Traceback (most recent call last):
    ...
    prismoe_store.errors.StoreError: another job is writing ... right now (it holds ...): wait for it to finish, or write to another output
    """
    url = location(url, write=True)
    if _is_url(url):
        with _JOB_LOCKS_GUARD:
            lock = _JOB_LOCKS.setdefault(url, threading.Lock())
        if not lock.acquire(blocking=False):
            raise StoreError(f"another job is writing {url} right now: wait for it to finish, or write to another output")
        try:
            yield
        finally:
            lock.release()
        return
    path = os.path.abspath(url).rstrip(os.sep)
    lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    try:
        fh = Path(lock_path).open("a")  # noqa: SIM115 (closed by the `with` below; this line only names the error)
    except OSError as e:
        raise StoreError(f"cannot write next to {url}: {e.strerror or e}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError(f"another job is writing {url} right now (it holds {lock_path}): wait for it "
                                 "to finish, or write to another output") from None
            raise
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_JOB_LOCKS: dict[str, threading.Lock] = {}
_JOB_LOCKS_GUARD = threading.Lock()
