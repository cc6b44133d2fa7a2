"""An LRU cache of tiles in device memory, with a byte budget it never exceeds.

The runtime asks for a tile with :meth:`TileCache.use`; a resident tile is a *hit*, an absent one
is a *miss*: it is read from the store (a ``load`` callable returning host arrays), copied to the
device and inserted, evicting least-recently-used tiles until it fits. The cache counts hits,
misses, evictions, bytes loaded and the peak of its resident bytes.

The budget only has to hold one tile (one cache entry: a float32 tile, or an INT8 tile plus its
scales); a tile larger than the budget raises :class:`~prismoe_store.errors.CacheError`. Below
"one token's tiles" the cache does not refuse: it *streams* — the runtime uses one tile at a time,
so tiles simply pass through the cache and are counted as misses each time they come back.

Overlap: :meth:`TileCache.prefetch` reads the next tile from the store on a background thread
while the device computes. On CUDA, host arrays are staged in pinned buffers and copied on a
separate copy stream; the compute stream waits on the copy's event only when it uses the tile,
and a tile is freed only after the compute that used it has finished, so the device memory held
by the cache stays within the budget. On CPU the same code path runs with no streams.

>>> import numpy as np
>>> c = TileCache(64, device="cpu")
>>> with c.use("t0", lambda: (np.ones((2, 4), np.float32),)) as (t,):
...     t.shape
torch.Size([2, 4])
>>> with c.use("t0", lambda: (np.ones((2, 4), np.float32),)) as (t,):
...     pass
>>> s = c.stats(); (s.hits, s.misses, s.bytes_loaded, s.peak_bytes)
(1, 1, 32, 32)
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Hashable, Iterator

import numpy as np
import torch

from .errors import CacheError

Loader = Callable[[], tuple[np.ndarray, ...]]  # reads one tile's host arrays from the store


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache counters."""

    hits: int  # requests served by a resident tile
    misses: int  # requests that loaded the tile from the store (a prefetched read counts here too)
    evictions: int  # tiles dropped to make room (or by evict/clear)
    bytes_loaded: int  # bytes copied into the cache
    peak_bytes: int  # largest resident bytes ever held
    budget_bytes: int  # the byte budget
    used_bytes: int  # resident bytes now
    tiles: int  # resident tiles now

    @property
    def hit_rate(self) -> float:
        """``hits / (hits + misses)`` (0 before any request)."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict:
        """Plain dict (with ``hit_rate``) for JSON."""
        return {**asdict(self), "hit_rate": self.hit_rate}


class _Entry:
    """One resident tile: its device tensors and the CUDA events guarding them."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], nbytes: int, ready):
        self.tensors = tensors  # device tensors (float32 tile) or (int8 tile, float32 scales)
        self.nbytes = nbytes  # bytes the entry holds on the device
        self.ready = ready  # CUDA event: the host→device copy finished (None on CPU)
        self.done = None  # CUDA event: the last compute that used the entry finished
        self.in_use = 0  # >0 while inside ``use``: never evicted then


class TileCache:
    """LRU tile cache in device memory with a byte budget (see the module docstring).

    >>> import numpy as np
    >>> c = TileCache(40, device="cpu")
    >>> for k in ("a", "b", "a"):
    ...     with c.use(k, lambda: (np.zeros(8, np.float32),)):
    ...         pass
    >>> c.stats().evictions, c.stats().peak_bytes <= 40
    (2, True)
    """

    def __init__(self, budget_bytes: int, *, device: str | torch.device = "cpu", prefetch: bool = True,
                 staging_buffers: int = 2):
        if not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 1:
            raise CacheError(f"cache budget must be a positive number of bytes, got {budget_bytes!r}")
        self.budget_bytes = int(budget_bytes)  # never exceeded by the resident bytes
        self.device = torch.device(device)  # where tiles live
        self._cuda = self.device.type == "cuda"
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # LRU order: oldest first
        self._used = 0
        self._counts = dict(hits=0, misses=0, evictions=0, bytes_loaded=0, peak_bytes=0)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tile-prefetch") if prefetch else None
        self._pending: dict[Hashable, Future] = {}  # host reads started by prefetch
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._staging: dict[tuple, list] = {}  # (shape, dtype) -> [pinned buffer, event] ring
        self._ring = staging_buffers

    # -- reading the cache -----------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        """Resident keys, least recently used first."""
        return list(self._entries)

    @property
    def used_bytes(self) -> int:
        """Resident bytes now."""
        return self._used

    def stats(self) -> CacheStats:
        """The counters now."""
        return CacheStats(**self._counts, budget_bytes=self.budget_bytes, used_bytes=self._used,
                          tiles=len(self._entries))

    def reset_stats(self) -> None:
        """Zero the counters (the peak restarts from the bytes resident now)."""
        self._counts = dict(hits=0, misses=0, evictions=0, bytes_loaded=0, peak_bytes=self._used)

    # -- using tiles -----------------------------------------------------------------------------
    @contextmanager
    def use(self, key: Hashable, load: Loader) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield the device tensors of ``key`` (loading them on a miss), protected from eviction.

        On CUDA the current stream waits for the tile's copy, and the tile is not freed until the
        work queued inside the block has finished.
        """
        entry = self._entries.get(key)
        if entry is None:
            entry = self._insert(key, self._host(key, load))
        else:
            self._counts["hits"] += 1
        self._entries.move_to_end(key)
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
        entry.in_use += 1
        try:
            yield entry.tensors
        finally:
            entry.in_use -= 1
            if self._cuda:
                entry.done = torch.cuda.Event()
                entry.done.record(torch.cuda.current_stream(self.device))

    def prefetch(self, key: Hashable, load: Loader) -> None:
        """Start reading ``key`` from the store on a background thread (no-op if resident or pending).

        The host read overlaps whatever runs meanwhile; the device copy happens at :meth:`use`.
        """
        if self._pool is None or key in self._entries or key in self._pending:
            return
        self._pending[key] = self._pool.submit(load)

    def _host(self, key: Hashable, load: Loader) -> tuple[np.ndarray, ...]:
        fut = self._pending.pop(key, None)
        return tuple(fut.result() if fut is not None else load())

    def _insert(self, key: Hashable, arrays: tuple[np.ndarray, ...]) -> _Entry:
        nbytes = sum(int(a.nbytes) for a in arrays)
        if nbytes > self.budget_bytes:
            raise CacheError(f"a tile of {nbytes} bytes does not fit the cache budget of {self.budget_bytes} bytes: "
                             f"raise --cache-mb to at least {nbytes / 2**20:.3f}")
        self._make_room(nbytes)
        tensors, ready = self._to_device(arrays)
        entry = _Entry(tensors, nbytes, ready)
        self._entries[key] = entry
        self._used += nbytes
        self._counts["misses"] += 1
        self._counts["bytes_loaded"] += nbytes
        self._counts["peak_bytes"] = max(self._counts["peak_bytes"], self._used)
        return entry

    def _make_room(self, nbytes: int) -> None:
        for key in list(self._entries):
            if self._used + nbytes <= self.budget_bytes:
                return
            if self._entries[key].in_use == 0:
                self._drop(key)
        if self._used + nbytes > self.budget_bytes:
            raise CacheError(f"cannot fit {nbytes} more bytes in a cache of {self.budget_bytes} bytes: "
                             f"{self._used} bytes are in use")

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        if entry.done is not None:
            entry.done.synchronize()  # the device has finished with it: its memory may be reused now
        self._used -= entry.nbytes
        self._counts["evictions"] += 1

    def _to_device(self, arrays: tuple[np.ndarray, ...]) -> tuple[tuple[torch.Tensor, ...], Any]:
        if not self._cuda:
            return tuple(_as_tensor(a).to(self.device) for a in arrays), None
        out, slots = [], []
        with torch.cuda.stream(self._copy_stream):
            for a in arrays:
                slot = self._stage(a)
                out.append(slot[0].to(self.device, non_blocking=True))
                slots.append(slot)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        for slot in slots:  # a staging buffer may be refilled once this copy is done
            slot[1] = ready
        return tuple(out), ready

    def _stage(self, a: np.ndarray) -> list:
        """Copy ``a`` into a pinned host buffer from a small ring (waiting for its last copy)."""
        ring = self._staging.setdefault((a.shape, a.dtype.str), [])
        if len(ring) < self._ring:
            slot = [torch.empty(a.shape, dtype=_as_tensor(a[:0]).dtype, pin_memory=True), None]
        else:
            slot = ring.pop(0)
            if slot[1] is not None:
                slot[1].synchronize()
        slot[0].copy_(_as_tensor(a))
        ring.append(slot)
        return slot

    # -- eviction --------------------------------------------------------------------------------
    def evict(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every resident tile whose key satisfies ``predicate``; returns how many."""
        keys = [k for k, e in self._entries.items() if predicate(k) and e.in_use == 0]
        for k in keys:
            self._drop(k)
        for k in [k for k in self._pending if predicate(k)]:
            self._pending.pop(k).cancel()
        return len(keys)

    def clear(self) -> None:
        """Drop every tile."""
        self.evict(lambda key: True)

    def close(self) -> None:
        """Drop every tile and stop the prefetch thread."""
        self.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``a`` (copied when ``a`` is read-only or not contiguous)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())
