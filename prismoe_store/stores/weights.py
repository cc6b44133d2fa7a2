"""The weights store: extracted weight matrices, each chunked one tile per chunk on its grid.

Layout of a Zarr v3 group (format ``"weights"``, version 1)::

    /                    attrs: options (StoreOptions)
    /tensors/<name>      [d_out, d_in], chunk (tile_out, tile_in); attrs: a TensorRecord
    /biases/<name>       float32 [d_out] (when the source had a bias)
    /_progress/...       per-tile (or per-band when sharded) done flags

>>> import numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores.weights import WeightsStore
>>> w = np.arange(48, dtype=np.float32).reshape(8, 6)
>>> store = WeightsStore.create("memory://doc-weights", overwrite=True)
>>> store.write_matrix("lm_head.weight", w, plan_grid(6, 8, 4))
>>> bool((WeightsStore.open("memory://doc-weights").read("lm_head.weight") == w).all())
True
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import zarr

from prismoe_store.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    StoreError,
    TensorNotFoundError,
)
from prismoe_store.grid import GridSpec
from prismoe_store.stores.formats import (
    StoreOptions,
    create_checked,
    create_chunked,
    existing_kind,
    location,
    open_checked,
)
from prismoe_store.stores.progress import Progress, recheck
from prismoe_store.stores.records import TensorRecord
from prismoe_store.stores.verified import check_stored, reading

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

    def record(self, tensor: str) -> TensorRecord:
        """The tensor's attributes, typed: grid, dtype, complete, source stamp and provenance.

        >>> from prismoe_store.grid import plan_grid
        >>> s = WeightsStore.create("memory://doc-weights-rec", overwrite=True)
        >>> s.write_matrix("w", np.ones((4, 4), np.float16), plan_grid(4, 4, 2))
        >>> r = s.record("w"); r.dtype, r.complete, r.stamp
        ('float16', True, None)
        """
        try:
            return TensorRecord.from_dict(self.info(tensor))
        except StoreError as e:
            raise CorruptStoreError(f"the attributes of {tensor!r} in {self.url} are damaged: {e}") from None

    def grid(self, tensor: str) -> GridSpec:
        """The tile grid a tensor is chunked on."""
        return self.record(tensor).grid

    # -- writing --
    def begin(self, tensor: str, grid: GridSpec, *, dtype="float32", source: dict | None = None) -> TensorWriter:
        """Start (or resume) writing ``tensor`` of shape ``(grid.d_out, grid.d_in)``.

        Resuming checks that the existing array has the same grid, dtype and source; finished
        units are kept and :meth:`TensorWriter.missing` lists what is left.
        """
        key = _key(tensor)
        options = self.options
        record = TensorRecord(tensor, grid, str(np.dtype(dtype)), complete=False, source=source or {})
        attrs = TensorRecord.from_dict(record.to_dict()).to_dict()  # a source stamp among ``source`` is checked too
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

    def chunks(u: int) -> list[tuple[zarr.Array, tuple[int, ...]]]:
        if sharded:
            return [(arr, (u, 0))] if u * grid.tile_out < grid.d_out else []
        rows, cols = grid.valid_region(u)
        return [(arr, grid.row_col(u))] if rows.stop > rows.start and cols.stop > cols.start else []

    if recheck(progress, chunks):
        arr.attrs["complete"] = False

