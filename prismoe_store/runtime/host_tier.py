"""The host-RAM tier: decompressed tiles kept in host memory under their own byte budget.

Between the store (compressed chunks on disk) and the device slots (:mod:`prismoe_store.runtime.slot_pool`)
sits a least-recently-used map of tile → host arrays. A device miss asks the tier first, so a tile
that left the device is not read and decompressed from the store again while it is still here.

The tier also *prefetches*: :meth:`HostTier.prefetch` reads tiles predicted to be needed soon
(by the runtime: the tiles selected most often so far that are not on the device) on a background
thread. A prefetched tile that a later request uses counts as a *prefetch hit*;
``prefetch_hit_rate`` is prefetch hits over tiles prefetched.

A budget of 0 turns the tier off: every request reads the store (and prefetch does nothing).

>>> import numpy as np
>>> reads = []
>>> tier = HostTier(64, lambda t: (reads.append(t) or np.full(4, t, np.float32),))
>>> [float(tier.get(t)[0][0]) for t in (1, 2, 1)], reads
([1.0, 2.0, 1.0], [1, 2])
>>> s = tier.stats(); (s["hits"], s["misses"], s["bytes"])
(1, 2, 32)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)  # a tile's key: (pipe, worker) for fitted adapters, a band for heads
Load = Callable[[K], tuple[np.ndarray, ...]]  # reads one tile's host arrays from the store


def hot_tiles(heat: np.ndarray, resident: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` tiles with the most heat (decayed selection counts) that are not ``resident``.

    >>> hot_tiles(np.array([5.0, 0.0, 3.0, 9.0]), np.array([False, False, False, True]), 2).tolist()
    [0, 2]
    """
    cold = np.flatnonzero(~resident & (heat > 0))
    return cold[np.argsort(-heat[cold], kind="stable")[:n]]


class HostTier(Generic[K]):
    """LRU host-RAM tier of decompressed tiles over ``load`` (see the module docstring)."""

    def __init__(self, budget_bytes: int, load: Load[K]):
        self.budget_bytes = max(0, int(budget_bytes))  # most bytes held (0: the tier is off)
        self.load = load  # reads a tile from the store
        self._tiles: OrderedDict[K, tuple[np.ndarray, ...]] = OrderedDict()  # LRU order: oldest first
        self._prefetched: set[K] = set()  # held because of a prefetch, not yet asked for
        self._pending: dict[K, Future] = {}  # prefetch reads under way
        self._lock = threading.Lock()
        self._bytes = 0
        self._counts = dict(hits=0, misses=0, prefetched=0, prefetch_hits=0, evictions=0)
        self._pool: ThreadPoolExecutor | None = None

    def get(self, key: K) -> tuple[np.ndarray, ...]:
        """The host arrays of tile ``key``: from the tier (a hit), a prefetch under way, or the store."""
        if self.budget_bytes == 0:
            self._counts["misses"] += 1
            return tuple(self.load(key))
        with self._lock:
            arrays = self._tiles.get(key)
            if arrays is not None:
                self._tiles.move_to_end(key)
                self._counts["hits"] += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self._counts["prefetch_hits"] += 1
                return arrays
            pending = self._pending.get(key)
        if pending is not None:  # the prefetch read is under way: wait for it rather than read twice
            pending.result()
            return self.get(key)
        self._counts["misses"] += 1
        arrays = tuple(self.load(key))
        self._put(key, arrays)
        return arrays

    def prefetch(self, keys: Iterable[K]) -> None:
        """Read ``keys`` not held yet into the tier on a background thread."""
        if self.budget_bytes == 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tile-prefetch")
        for key in keys:
            with self._lock:
                if key in self._tiles or key in self._pending:
                    continue
                self._pending[key] = self._pool.submit(self._prefetch_one, key)

    def _prefetch_one(self, key: K) -> None:
        try:
            arrays = tuple(self.load(key))
            if self._put(key, arrays):
                with self._lock:
                    self._prefetched.add(key)
                    self._counts["prefetched"] += 1
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _put(self, key: K, arrays: tuple[np.ndarray, ...]) -> bool:
        nbytes = sum(int(a.nbytes) for a in arrays)
        if nbytes > self.budget_bytes:
            return False
        with self._lock:
            if key in self._tiles:
                return False
            while self._bytes + nbytes > self.budget_bytes:
                old, dropped = self._tiles.popitem(last=False)
                self._prefetched.discard(old)
                self._bytes -= sum(int(a.nbytes) for a in dropped)
                self._counts["evictions"] += 1
            self._tiles[key] = arrays
            self._bytes += nbytes
        return True

    def wait(self) -> None:
        """Block until every prefetch read under way has finished."""
        for fut in list(self._pending.values()):
            fut.result()

    def __contains__(self, key: K) -> bool:
        return key in self._tiles

    def stats(self) -> dict:
        """Counters: ``hits``, ``misses`` (store reads on request), ``prefetched``, ``prefetch_hits``,
        ``prefetch_hit_rate``, ``evictions``, ``bytes`` held, ``budget_bytes``."""
        c: dict[str, float] = dict(self._counts)
        c["prefetch_hit_rate"] = c["prefetch_hits"] / c["prefetched"] if c["prefetched"] else 0.0
        return {**c, "bytes": self._bytes, "budget_bytes": self.budget_bytes}

    def reset_stats(self) -> None:
        """Zero the counters (held tiles stay)."""
        self._counts = dict(hits=0, misses=0, prefetched=0, prefetch_hits=0, evictions=0)

    def close(self) -> None:
        """Stop the prefetch thread and drop every tile."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            self._tiles.clear()
            self._prefetched.clear()
            self._pending.clear()
            self._bytes = 0
