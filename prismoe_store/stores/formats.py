"""Where a store lives, what format it is, how its arrays are encoded, and who may write it.

Every prismoe store is a Zarr v3 group whose attributes carry ``{"prismoe_store": {"format":
NAME, "version": N}}`` so a reader refuses what it does not understand (:func:`check_format`).
Chunks carry a crc32c checksum and an optional compressor (:class:`StoreOptions`), and every
store is read and written through :class:`~prismoe_store.stores.verified.VerifiedStore`.

Outputs are checked before anything is written (:func:`create_checked`): an empty path, an unknown
or read-only protocol, or an existing path that is not a store of the expected kind is refused
(``overwrite`` replaces only a store of that kind); ``file://`` URLs are local paths. One job at a
time writes a store (:func:`job_lock`).

>>> g = create_checked("memory://doc-formats", "pairs", 1, overwrite=True)
>>> check_format(g, "weights", 1)
Traceback (most recent call last):
...
prismoe_store.errors.StoreFormatError: store is a pairs store, not a weights store
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from prismoe_store.errors import StoreError, StoreFormatError
from prismoe_store.stores.verified import VerifiedStore

FORMAT_KEY = "prismoe_store"  # the root attribute that names a store's format and version
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
    >>> location("bogus://x")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    prismoe_store.errors.StoreError: bogus://x: unknown protocol 'bogus'
    (not a path, and no fsspec filesystem of that name)
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
        raise StoreFormatError(f"store{where} is {describe_kind(str(tag.get('format')))}, not {_a(name)} store")
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
            raise StoreFormatError(f"{location(url)} holds {describe_kind(kind)}, not {_a(name)} store")
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
    found = check_output(url, name, storage_options=storage_options)
    if found is not None:
        if not overwrite:
            raise StoreError(f"{url} already exists (pass overwrite=True / --overwrite to replace it)")
        foreign = foreign_entries(url)
        if foreign:
            raise StoreFormatError(f"{url} holds files that are not part of the {name} store ({', '.join(foreign[:3])}"
                                   f"{', …' if len(foreign) > 3 else ''}): refusing to delete them with it; move "
                                   "them out, or choose another output")
    group = open_root(url, "w", storage_options=storage_options)
    group.attrs.update({**format_attrs(name, version), **(attrs or {})})
    group.store.strict = True
    return group


def foreign_entries(url: str) -> list[str]:
    """The entries of a local store folder that no store writes (a store holds ``zarr.json``, hidden
    files such as its lock, and folders of groups and arrays, each with its ``zarr.json``), sorted;
    ``[]`` for a URL that is not a local folder.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "zarr.json"), "w").write("{}")
    >>> _ = open(os.path.join(d, "NOTES.md"), "w").write("mine"); os.makedirs(os.path.join(d, "pipe1"))
    >>> _ = open(os.path.join(d, "pipe1", "zarr.json"), "w").write("{}")
    >>> foreign_entries(d)
    ['NOTES.md']
    """
    if _is_url(url) or not os.path.isdir(url):
        return []
    return sorted(e.name for e in os.scandir(url) if not e.name.startswith(".") and e.name != "zarr.json"
                  and not (e.is_dir() and os.path.isfile(os.path.join(e.path, "zarr.json"))))


def check_output(url, name: str, *, storage_options=None) -> str | None:
    """What is at the output ``url`` a job writes a ``name`` store to: ``None`` (nothing) or ``name``
    (a store of that format, to resume or replace); anything else (a file, a folder of other files,
    another kind of store) is refused with :class:`StoreFormatError`, even with ``--overwrite``.
    Cheap: a job calls it before its slow work.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "notes.md"), "w").write("mine")
    >>> check_output(d, "pairs")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prismoe_store.errors.StoreFormatError: ... holds a folder of other files, not a pairs store: ...
    """
    url = location(url, write=True)
    found = existing_kind(url, storage_options=storage_options)
    if found is not None and found != name:
        raise StoreFormatError(f"{url} holds {describe_kind(found)}, not {_a(name)} store: refusing to replace it "
                               f"(--overwrite replaces only {_a(name)} store); choose another output")
    return found


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


def describe_kind(kind: str) -> str:
    """What :func:`existing_kind` found, in words (``"a folder of other files"``, ``"a pairs store"``)."""
    return {"file": "a file", "folder": "a folder of other files", "zarr": "a Zarr store that is no prismoe store",
            "unreadable": "a store whose zarr.json cannot be read"}.get(kind, f"{_a(kind)} store")




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
    >>> with job_lock(os.path.join(d, "s.zarr")):  # doctest: +NORMALIZE_WHITESPACE
    ...     with job_lock(os.path.join(d, "s.zarr")):
    ...         pass
    Traceback (most recent call last):
    ...
    prismoe_store.errors.StoreError: another job is writing ... right now (it holds ...):
    wait for it to finish, or write to another output
    """
    url = location(url, write=True)
    if _is_url(url):
        with _JOB_LOCKS_GUARD:
            lock = _JOB_LOCKS.setdefault(url, threading.Lock())
        if not lock.acquire(blocking=False):
            raise StoreError(f"another job is writing {url} right now: "
                             "wait for it to finish, or write to another output")
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
