"""A pool of preallocated device slots for band tiles, with LRU eviction inside a byte budget.

Like a paged KV cache: one device tensor holds ``slots`` band tiles (float32 ``[slots, a, d]``,
or INT8 ``[slots, a, d]`` plus float32 scales ``[slots, a]``); a band → slot map says which band
sits where. A call asks for the union of its bands with :meth:`BandPool.acquire`: resident bands
are hits, the others are read from the store and copied into free slots, or into the slots of the
least recently used bands — never into a slot the same call acquired (those are pinned until the
call's :meth:`release`). The compute then gathers slots and multiplies in one batched kernel.

Byte counts are true bytes: a short edge band counts its true rows only.

>>> import numpy as np, torch
>>> bands = np.arange(24, dtype=np.float32).reshape(4, 2, 3)      # 4 bands of 2 rows, d = 3
>>> pool = BandPool(n_bands=4, band_rows=2, d=3, budget_bytes=2 * 24, load=lambda b: (bands[b],))
>>> slots = pool.acquire(np.array([0, 3]))
>>> pool.weights(slots)[1].tolist() == bands[3].tolist()
True
>>> pool.release(); s = pool.stats(); (s.misses, s.hits, s.evictions)
(2, 0, 0)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .errors import CacheError

Load = Callable[[int], tuple[np.ndarray, ...]]  # band -> (float32 [rows, d],) or (int8 [rows, d], scales [rows])


@dataclass(frozen=True)
class PoolStats:
    """Counters of a :class:`BandPool` (bytes are true bytes of the bands)."""

    hits: int  # bands asked for that were resident
    misses: int  # bands loaded from the store
    evictions: int  # resident bands dropped to make room
    bytes_loaded: int  # bytes copied into the pool
    peak_bytes: int  # most bytes resident at once
    budget_bytes: int  # the byte budget (slots × bytes per slot)
    used_bytes: int  # bytes resident now
    tiles: int  # bands resident now
    slots: int  # slots in the pool

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 1.0 before any request."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 1.0

    def to_dict(self) -> dict:
        """Counters and the hit rate."""
        return {**asdict(self), "hit_rate": self.hit_rate}


class BandPool:
    """Device slots for band tiles (see the module docstring)."""

    def __init__(self, *, n_bands: int, band_rows: int, d: int, budget_bytes: int, load: Load,
                 quant: str | None = None, device: str | torch.device = "cpu", last_rows: int | None = None,
                 read_threads: int = 4):
        self.n_bands, self.band_rows, self.d = n_bands, band_rows, d  # bands, rows a per band, width d
        self.quant = quant  # None (float32) or "int8"
        self.device = torch.device(device)
        self.load = load  # reads one band from the store
        self.last_rows = band_rows if last_rows is None else last_rows  # true rows of the last band
        self.slot_bytes = band_rows * d * (1 if quant == "int8" else 4) + (4 * band_rows if quant == "int8" else 0)
        slots = min(n_bands, int(budget_bytes) // self.slot_bytes)
        if slots < 1:
            raise CacheError(f"the cache budget of {budget_bytes} bytes is smaller than one band tile "
                             f"({self.slot_bytes} bytes): raise --cache-mb to at least {self.slot_bytes / 2**20:.3f}")
        self.slots = slots
        dtype = torch.int8 if quant == "int8" else torch.float32
        self.data = torch.zeros(slots, band_rows, d, dtype=dtype, device=self.device)  # [slots, a, d]
        self.scales = (torch.zeros(slots, band_rows, device=self.device) if quant == "int8" else None)  # [slots, a]
        self.slot_of = np.full(n_bands, -1, np.int64)  # band -> slot (-1: not resident)
        self.band_of = np.full(slots, -1, np.int64)  # slot -> band (-1: free)
        self.last_use = np.zeros(slots, np.int64)  # LRU clock per slot
        self.pinned = np.zeros(slots, bool)  # acquired by the current call: never overwritten
        self._clock = 0
        self._counts = dict(hits=0, misses=0, evictions=0, bytes_loaded=0, peak_bytes=0)
        self._used = 0
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="band-read") if read_threads > 1 else None

    # -- bookkeeping -----------------------------------------------------------------------------
    def band_bytes(self, band: int) -> int:
        """True bytes of one band (its true rows only)."""
        rows = self.last_rows if band == self.n_bands - 1 else self.band_rows
        return rows * self.d * (1 if self.quant == "int8" else 4) + (4 * rows if self.quant == "int8" else 0)

    def stats(self) -> PoolStats:
        """The counters now."""
        return PoolStats(**self._counts, budget_bytes=self.slots * self.slot_bytes, used_bytes=self._used,
                         tiles=int((self.band_of >= 0).sum()), slots=self.slots)

    def reset_stats(self) -> None:
        """Zero the counters (resident bands stay; the peak restarts from the bytes resident now)."""
        self._counts = dict(hits=0, misses=0, evictions=0, bytes_loaded=0, peak_bytes=self._used)

    def resident(self, bands: np.ndarray) -> np.ndarray:
        """Mask ``[n]``: which of ``bands`` are resident."""
        return self.slot_of[bands] >= 0

    # -- acquire / release -----------------------------------------------------------------------
    def acquire(self, bands: np.ndarray) -> torch.Tensor:
        """Make ``bands`` (unique band ids) resident and pin them; returns their slots ``[n]`` (device).

        Raises :class:`CacheError` when the unpinned slots cannot hold the missing bands (ask for
        at most :attr:`free_for_call` bands per call).
        """
        bands = np.asarray(bands, np.int64)
        self._clock += 1
        slots = self.slot_of[bands].copy()  # [n]
        hit = slots >= 0
        self._counts["hits"] += int(hit.sum())
        self.pinned[slots[hit]] = True
        missing = bands[~hit]
        if len(missing):
            free = self._take_slots(len(missing))  # [m] slots, evicting LRU unpinned ones
            self._fill(missing, free)
            slots[~hit] = free
        self.last_use[slots] = self._clock
        return torch.as_tensor(slots, device=self.device)

    @property
    def free_for_call(self) -> int:
        """Slots not pinned by the current call."""
        return int(self.slots - self.pinned.sum())

    def release(self) -> None:
        """Unpin every slot (end of a call)."""
        self.pinned[:] = False

    def _take_slots(self, n: int) -> np.ndarray:
        candidates = np.flatnonzero(~self.pinned)
        if len(candidates) < n:
            raise CacheError(f"the cache holds {self.slots} band tiles and this call pins "
                             f"{self.slots - len(candidates)}: {n} more do not fit")
        # free slots first (band -1, clock 0), then least recently used
        order = np.lexsort((self.last_use[candidates], self.band_of[candidates] >= 0))
        take = candidates[order[:n]]
        for s in take[self.band_of[take] >= 0]:
            old = int(self.band_of[s])
            self.slot_of[old] = -1
            self._used -= self.band_bytes(old)
            self._counts["evictions"] += 1
        return take

    def _fill(self, bands: np.ndarray, slots: np.ndarray) -> None:
        reads = self._readers.map(self.load, bands.tolist()) if self._readers else map(self.load, bands.tolist())
        for band, slot, arrays in zip(bands.tolist(), slots.tolist(), reads):
            rows = arrays[0].shape[0]
            self.data[slot, :rows].copy_(torch.from_numpy(np.ascontiguousarray(arrays[0])), non_blocking=True)
            self.data[slot, rows:].zero_()
            if self.scales is not None:
                self.scales[slot, :rows].copy_(torch.from_numpy(np.ascontiguousarray(arrays[1], np.float32)))
                self.scales[slot, rows:].zero_()
            self.slot_of[band], self.band_of[slot] = slot, band
            nbytes = self.band_bytes(band)
            self._used += nbytes
            self._counts["misses"] += 1
            self._counts["bytes_loaded"] += nbytes
        self.pinned[slots] = True
        self._counts["peak_bytes"] = max(self._counts["peak_bytes"], self._used)

    # -- reading slots ---------------------------------------------------------------------------
    def weights(self, slots: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 band tiles ``[n, a, d]`` of ``slots`` (INT8 dequantized on the device), gathered into
        ``out`` (``[n, a, d]`` float32) when given, so a call allocates nothing."""
        if self.scales is None:
            return self.data[slots] if out is None else torch.index_select(self.data, 0, slots, out=out)
        q = self.data[slots]  # [n, a, d] int8
        out = q.to(torch.float32) if out is None else out.copy_(q)
        return out.mul_(self.scales[slots][..., None])

    def rows(self, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Single rows ``[n, d]``: row ``offsets[i]`` of slot ``slots[i]`` (INT8 dequantized)."""
        rows = self.data[slots, offsets]  # [n, d]
        if self.scales is None:
            return rows
        return rows.to(torch.float32).mul_(self.scales[slots, offsets][:, None])

    def clear(self) -> None:
        """Drop every band."""
        self.slot_of[:] = -1
        self.band_of[:] = -1
        self.pinned[:] = False
        self._used = 0

    def close(self) -> None:
        """Drop every band and stop the reader threads."""
        self.clear()
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
