"""The progress record: which units of a resumable job are finished, and re-checking them on resume.

Because Zarr reads a missing chunk as zeros, finished work is recorded in the store's own
*progress record* (one tiny chunk per unit, so concurrent writers never share a chunk), never
inferred from chunk presence. A resuming job trusts a finished unit only while the chunks it
wrote still match their records (:func:`recheck`).

>>> g = zarr.open_group("memory://doc-progress-mod", mode="w")
>>> p = Progress.create(g, "bands", 3)
>>> p.mark_many([0, 2]); p.missing(), p.complete()
([1], False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from prismoe_store.errors import StoreError
from prismoe_store.stores.verified import damaged_chunks, reading


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
        units = np.asarray(sorted({int(u) for u in units}), dtype=np.int64)
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



def recheck(progress: Progress,
            chunks: Callable[[int], Iterable[tuple[zarr.Array, tuple[int, ...]]]]) -> list[int]:
    """Mark unfinished again every finished unit of ``progress`` one of whose stored chunks is
    missing, unrecorded or does not match its record; returns those units (ascending).

    ``chunks(unit)`` lists the ``(array, chunk coordinates)`` a unit wrote (shard coordinates for
    sharded arrays). Each chunk is read once; a resuming job calls this before trusting its record,
    so a damaged chunk is written again instead of failing the next reader.

    >>> g = zarr.open_group("memory://doc-recheck", mode="w")
    >>> a = g.create_array("a", shape=(4,), chunks=(2,), dtype="f4")
    >>> p = Progress.create(g, "a", 2); p.mark_many([0, 1])
    >>> recheck(p, lambda u: [(a, (u,))])  # not a verified store: nothing is recorded, nothing checked
    []
    """
    wanted: dict[int, tuple[zarr.Array, dict[tuple[int, ...], list[int]]]] = {}
    for u in progress.done():
        for array, coord in chunks(u):
            wanted.setdefault(id(array), (array, {}))[1].setdefault(tuple(coord), []).append(u)
    bad: set[int] = set()
    for array, coords in wanted.values():
        for c in damaged_chunks(array, coords):
            bad.update(coords[c])
    if bad:
        progress.unmark(bad)
    return sorted(bad)

