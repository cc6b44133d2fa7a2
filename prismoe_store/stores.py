"""Zarr v3 store machinery shared by the weights, pairs and adapter stores, and the weights store.

Every prismoe store is a Zarr v3 group whose attributes carry ``{"prismoe_store": {"format":
NAME, "version": N}}`` so a reader refuses what it does not understand. Chunks carry a crc32c
checksum (a corrupt chunk raises :class:`~prismoe_store.errors.CorruptStoreError`), and an
optional compressor. Because Zarr reads a missing chunk as zeros, finished work is recorded in
the store's own *progress record* (one tiny chunk per unit, so concurrent writers never share a
chunk), never inferred from chunk presence.

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

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import CorruptStoreError, IncompleteStoreError, StoreError, StoreFormatError, TensorNotFoundError
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


def open_root(url: str | os.PathLike, mode: str = "r", *, storage_options: dict | None = None) -> zarr.Group:
    """Open the Zarr v3 group at a local path or fsspec URL; a clear error when there is none."""
    url = str(url)
    if mode == "r" and not _is_url(url) and not os.path.exists(url):
        raise StoreError(f"no store at {url}")
    try:
        kw = {"storage_options": storage_options} if storage_options and _is_url(url) else {}
        return zarr.open_group(url, mode=mode, zarr_format=3 if mode in ("w", "w-") else None, **kw)
    except FileNotFoundError:
        raise StoreError(f"no store at {url}") from None
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise StoreError(f"cannot open store {url}: {e}") from None


def format_attrs(name: str, version: int) -> dict:
    """The attribute that names a store's format and version."""
    return {FORMAT_KEY: {"format": name, "version": version}}


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
    """:func:`open_root` then :func:`check_format`."""
    group = open_root(url, mode, storage_options=storage_options)
    check_format(group, name, version, str(url))
    return group


def create_checked(url, name: str, version: int, *, overwrite: bool = False, attrs: dict | None = None,
                   storage_options=None) -> zarr.Group:
    """Create a new store of format ``name``; refuses to clobber an existing one unless ``overwrite``."""
    url = str(url)
    if not overwrite and store_exists(url):
        raise StoreError(f"{url} already exists (pass overwrite=True / --overwrite to replace it)")
    group = open_root(url, "w", storage_options=storage_options)
    group.attrs.update({**format_attrs(name, version), **(attrs or {})})
    return group


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
    def create(cls, group: zarr.Group, name: str, units: int) -> "Progress":
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
    def open(cls, group: zarr.Group, name: str) -> "Progress | None":
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
    def create(cls, url, *, options: StoreOptions | None = None, overwrite: bool = False) -> "WeightsStore":
        """Create an empty weights store (or open an existing one to add/resume tensors)."""
        options = options or StoreOptions()
        url = str(url)
        group = None
        if not overwrite and store_exists(url):
            group = open_checked(url, WEIGHTS_FORMAT, WEIGHTS_VERSION, "a", storage_options=options.storage_options)
        if group is None:
            group = create_checked(url, WEIGHTS_FORMAT, WEIGHTS_VERSION, overwrite=True,
                                   storage_options=options.storage_options)
        group.attrs["options"] = {"compressor": options.compressor, "level": options.level, "shard": options.shard}
        return cls(group, url)

    @classmethod
    def open(cls, url, mode: str = "r", *, storage_options: dict | None = None) -> "WeightsStore":
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


def store_exists(url: str) -> bool:
    """True when something (a Zarr group or any file) is already at ``url``."""
    if _is_url(url):
        try:
            zarr.open_group(url, mode="r")
            return True
        except (FileNotFoundError, ValueError, KeyError, OSError):
            return False
    return os.path.exists(url) and (not os.path.isdir(url) or bool(os.listdir(url)))
