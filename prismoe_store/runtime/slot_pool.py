"""A pool of preallocated device slots for tiles of one shape, with LRU eviction inside a byte budget.

Like a paged KV cache: one device tensor holds ``slots`` tiles, each stored transposed (float32
``[slots, d, a]``, or INT8 ``[slots, d, a]`` plus float32 scales ``[slots, a]``; a tile is ``a``
rows of width ``d``), laid out in a byte *arena* the pool owns or is given (pools of different tile
shapes can share one arena and take turns in it); a tile → slot map says which tile sits where. A
call asks for the tiles it needs with :meth:`SlotPool.acquire`: resident tiles are hits, the others
are read (``load``) and copied into free slots, or into the slots of the least recently used tiles
(or, given the callers' ``heat``, of the least often selected, ties broken by recency) — never into
a slot the same call acquired (those are pinned until the call's :meth:`release`). The compute then
runs in one batched kernel over the slots: :meth:`products` (the tiles times one input per tile: a
fused gather-and-multiply ``embedding_bag`` over the transposed tiles for float32, else a gather
and a ``bmm``) or a gather of :meth:`weights` and a product of the caller's.

On CUDA, loads are staged in a pinned host buffer and copied on a side stream; the compute stream
waits for that copy before it reads the slots, and a copy into a slot waits for the compute that
last used it (the event recorded at :meth:`release`). On the CPU the same code runs with no streams.

Byte counts are true bytes: a tile with fewer true rows (a short last band) counts those rows only.

>>> import numpy as np, torch
>>> tiles = np.arange(24, dtype=np.float32).reshape(4, 2, 3)      # 4 tiles of 2 rows, d = 3
>>> pool = SlotPool(n_tiles=4, tile_shape=(2, 3), budget_bytes=2 * 24, load=lambda t: (tiles[t],))
>>> slots = pool.acquire(np.array([0, 3]))
>>> pool.weights(slots)[1].T.tolist() == tiles[3].tolist()
True
>>> x = torch.ones(2, 3)
>>> bool(torch.equal(pool.products(slots, x), torch.from_numpy(tiles[[0, 3]]).sum(-1)))
True
>>> pool.release(); s = pool.stats(); (s.misses, s.hits, s.evictions, s.slots)
(2, 0, 0, 2)
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from prismoe_store.errors import CacheError

Load = Callable[[int], tuple[np.ndarray, ...]]  # tile -> (float32 [rows, d],) or (int8 [rows, d], float32 [rows])
STAGE_TILES = 32  # tiles staged in pinned host memory per CUDA copy
HUGE_PAGE = 2 << 20  # bytes of a transparent huge page (x86-64): smaller arenas take plain pages


@dataclass(frozen=True)
class PoolStats:
    """Counters of a :class:`SlotPool` (bytes are true bytes of the tiles)."""

    hits: int  # tiles asked for that were resident
    misses: int  # tiles loaded into the pool
    evictions: int  # resident tiles dropped (to make room, or cleared)
    bytes_loaded: int  # bytes copied into the pool
    peak_bytes: int  # most bytes resident at once
    budget_bytes: int  # bytes of the pool's slots
    used_bytes: int  # bytes resident now
    tiles: int  # tiles resident now
    slots: int  # slots in the pool

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 1.0 before any request."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 1.0

    def to_dict(self) -> dict:
        """Counters and the hit rate."""
        return {**asdict(self), "hit_rate": self.hit_rate}

    @staticmethod
    def combine(stats: list[PoolStats], *, peak_bytes: int, budget_bytes: int) -> PoolStats:
        """The counters of several pools summed (the peak and budget are the caller's, taken over all)."""
        total = {k: sum(getattr(s, k) for s in stats) for k in ("hits", "misses", "evictions", "bytes_loaded",
                                                                 "used_bytes", "tiles", "slots")}
        return PoolStats(**total, peak_bytes=peak_bytes, budget_bytes=budget_bytes)


def slot_bytes(tile_shape: tuple[int, int], quant: str | None) -> int:
    """Bytes of one slot: ``a·d`` float32 values, or ``a·d`` INT8 values plus ``a`` float32 scales.

    >>> slot_bytes((2, 3), None), slot_bytes((2, 3), "int8")
    (24, 14)
    """
    a, d = tile_shape
    return a * d + 4 * a if quant == "int8" else 4 * a * d


def new_arena(nbytes: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A uint8 arena ``[nbytes]`` for slots on ``device``. On the CPU (Linux) it lies in anonymous
    memory advised for transparent huge pages: the grouped products stream every tile of the arena
    through the GEMMs, and 2 MiB pages spare most of the TLB misses (measured 3-6 % faster on the
    4096 → 8192 seed layout, 1 thread); elsewhere ``torch.empty``.

    >>> a = new_arena(3 << 20); a.dtype, a.numel() == 3 << 20
    (torch.uint8, True)
    """
    device = torch.device(device)
    if device.type != "cpu" or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8)  # the tensor keeps the mapping alive


class SlotPool:
    """Device slots for tiles of one shape (see the module docstring).

    ``tile_rows[t]`` gives tile ``t``'s true rows (default: all ``a``); ``arena`` a uint8 device
    tensor to lay the slots in (default: allocated here, ``budget_bytes`` rounded down to slots).
    Raises :class:`CacheError` when the budget holds no slot.
    """

    def __init__(self, *, n_tiles: int, tile_shape: tuple[int, int], budget_bytes: int, load: Load,
                 quant: str | None = None, device: str | torch.device = "cpu", tile_rows: np.ndarray | None = None,
                 arena: torch.Tensor | None = None, read_threads: int = 4, heat: np.ndarray | None = None):
        self.n_tiles = int(n_tiles)  # tiles the pool serves
        self.tile_shape = (int(tile_shape[0]), int(tile_shape[1]))  # (a, d): rows and width of a tile
        self.quant = quant  # None (float32) or "int8"
        self.device = torch.device(device)
        self.load = load  # reads one tile's host arrays
        self.heat = heat  # [n_tiles] selection counts kept by the caller: evict the coldest (None: LRU)
        self.slot_bytes = slot_bytes(self.tile_shape, quant)
        budget = int(budget_bytes if arena is None else arena.numel())
        self.slots = min(self.n_tiles, budget // self.slot_bytes)  # slots in the pool
        if self.slots < 1:
            raise CacheError(f"the cache budget of {budget} bytes is smaller than one tile ({self.slot_bytes} "
                             f"bytes): raise --cache-mb to at least {self.slot_bytes / 2**20:.3f}")
        a, d = self.tile_shape
        rows = np.full(self.n_tiles, a, np.int64) if tile_rows is None else np.asarray(tile_rows, np.int64)
        per_row = d + 4 if quant == "int8" else 4 * d
        self.tile_bytes = rows * per_row  # [n_tiles] true bytes of each tile
        self.tile_rows = rows  # [n_tiles] true rows of each tile
        if arena is None:
            arena = torch.empty(self.slots * self.slot_bytes, dtype=torch.uint8, device=self.device)
        self.data, self.scales = self._lay_out(arena)  # [slots, d, a] float32 or int8 (transposed tiles); [slots, a]
        self.slot_of = np.full(self.n_tiles, -1, np.int64)  # tile -> slot (-1: not resident)
        self.tile_of = np.full(self.slots, -1, np.int64)  # slot -> tile (-1: free)
        self.last_use = np.zeros(self.slots, np.int64)  # LRU clock per slot
        self.pinned = np.zeros(self.slots, bool)  # acquired by the current call: never overwritten
        self._clock = 0
        self._counts = dict(hits=0, misses=0, evictions=0, bytes_loaded=0, peak_bytes=0)
        self._used = 0
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="tile-read") if read_threads > 1 else None
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._staging: torch.Tensor | None = None  # pinned host buffer [STAGE_TILES, a, d] (CUDA)
        self._staged_scales: torch.Tensor | None = None  # pinned [STAGE_TILES, a] (CUDA, INT8)
        self._copied: torch.cuda.Event | None = None  # CUDA event: the last copy out of the staging buffer finished
        self._released: torch.cuda.Event | None = None  # CUDA event: the last call's compute is done with its slots

    def _lay_out(self, arena: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, d = self.tile_shape
        if self.quant == "int8":  # scales first (the arena starts 4-byte aligned), then the values
            scales = arena[: 4 * self.slots * a].view(torch.float32).view(self.slots, a)
            values = arena[4 * self.slots * a: self.slots * self.slot_bytes].view(torch.int8).view(self.slots, d, a)
            return values, scales
        return arena[: self.slots * self.slot_bytes].view(torch.float32).view(self.slots, d, a), None

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        """True bytes resident now."""
        return self._used

    def stats(self) -> PoolStats:
        """The counters now."""
        return PoolStats(**self._counts, budget_bytes=self.slots * self.slot_bytes, used_bytes=self._used,
                         tiles=int((self.tile_of >= 0).sum()), slots=self.slots)

    def reset_stats(self) -> None:
        """Zero the counters (resident tiles stay; the peak restarts from the bytes resident now)."""
        self._counts = dict(hits=0, misses=0, evictions=0, bytes_loaded=0, peak_bytes=self._used)

    def resident(self, tiles: np.ndarray) -> np.ndarray:
        """Mask ``[n]``: which of ``tiles`` are resident."""
        return self.slot_of[np.asarray(tiles, np.int64)] >= 0

    @property
    def free_for_call(self) -> int:
        """Slots not pinned by the current call."""
        return int(self.slots - self.pinned.sum())

    # -- acquire / release -----------------------------------------------------------------------
    def acquire(self, tiles: np.ndarray) -> torch.Tensor:
        """Make ``tiles`` (unique tile ids) resident and pin them; returns their slots ``[n]`` (int64, device).

        Raises :class:`CacheError` when the unpinned slots cannot hold the missing tiles (ask for
        at most :attr:`free_for_call` tiles per call).
        """
        tiles = np.asarray(tiles, np.int64)
        slots = self.slot_of[tiles].copy()  # [n]
        hit = slots >= 0
        self._counts["hits"] += int(hit.sum())
        self.pinned[slots[hit]] = True
        missing = tiles[~hit]
        if len(missing):
            free = self._take_slots(len(missing))  # [m] slots, evicting LRU unpinned ones
            self._fill(missing, free)
            slots[~hit] = free
        self.last_use[slots] = self._clock + 1 + np.arange(len(tiles))  # earlier in the list: older
        self._clock += len(tiles)
        return torch.as_tensor(slots, device=self.device)

    def release(self) -> None:
        """Unpin every slot (end of a call); on CUDA, later copies into them wait for this call's compute."""
        self.pinned[:] = False
        if self._copy_stream is not None:
            self._released = torch.cuda.Event()
            self._released.record(torch.cuda.current_stream(self.device))

    def _take_slots(self, n: int) -> np.ndarray:
        candidates = np.flatnonzero(~self.pinned)
        if len(candidates) < n:
            raise CacheError(f"the cache holds {self.slots} tiles and this call pins "
                             f"{self.slots - len(candidates)}: {n} more do not fit")
        # free slots first, then the coldest (with heat) and least recently used
        tiles = self.tile_of[candidates]
        cold = np.zeros(len(candidates)) if self.heat is None else np.where(tiles >= 0, self.heat[tiles], 0.0)
        order = np.lexsort((self.last_use[candidates], cold, tiles >= 0))
        take = candidates[order[:n]]
        old = self.tile_of[take]
        old = old[old >= 0]
        self.slot_of[old] = -1
        self.tile_of[take] = -1
        self._used -= int(self.tile_bytes[old].sum())
        self._counts["evictions"] += len(old)
        return take

    def _fill(self, tiles: np.ndarray, slots: np.ndarray) -> None:
        ids = tiles.tolist()
        reads = self._readers.map(self.load, ids) if self._readers and len(ids) > 1 else map(self.load, ids)
        if self._copy_stream is None:
            for slot, arrays in zip(slots.tolist(), reads, strict=True):
                self._write_slot(self.data[slot], None if self.scales is None else self.scales[slot], arrays)
        else:
            self._fill_cuda(list(reads), slots)
        self.slot_of[tiles], self.tile_of[slots] = slots, tiles
        nbytes = int(self.tile_bytes[tiles].sum())
        self._used += nbytes
        self._counts["misses"] += len(tiles)
        self._counts["bytes_loaded"] += nbytes
        self.pinned[slots] = True
        self._counts["peak_bytes"] = max(self._counts["peak_bytes"], self._used)

    @staticmethod
    def _write_slot(values: torch.Tensor, scales: torch.Tensor | None, arrays: tuple[np.ndarray, ...]) -> None:
        """Copy one tile's host arrays ``[rows, d]`` into a slot ``[d, a]`` (or a staging row), transposed,
        zeroing the rows past its true rows."""
        rows = arrays[0].shape[0]
        values[:, :rows].copy_(torch.from_numpy(np.ascontiguousarray(arrays[0])).T)
        values[:, rows:].zero_()
        if scales is not None:
            scales[:rows].copy_(torch.from_numpy(np.ascontiguousarray(arrays[1], np.float32)))
            scales[rows:].zero_()

    def _fill_cuda(self, arrays: list[tuple[np.ndarray, ...]], slots: np.ndarray) -> None:
        """Stage tiles in pinned memory and copy them into their slots on the side stream."""
        assert self._copy_stream is not None, "CUDA pools have a copy stream"
        if self._staging is None:
            a, d = self.tile_shape
            self._staging = torch.empty((STAGE_TILES, d, a), dtype=self.data.dtype, pin_memory=True)
            if self.scales is not None:
                self._staged_scales = torch.empty((STAGE_TILES, self.tile_shape[0]), pin_memory=True)
        for start in range(0, len(arrays), STAGE_TILES):
            chunk = arrays[start:start + STAGE_TILES]
            if self._copied is not None:
                self._copied.synchronize()  # the staging buffer's last copy has left it
            for i, arr in enumerate(chunk):
                self._write_slot(self._staging[i], None if self._staged_scales is None else self._staged_scales[i], arr)
            target = torch.as_tensor(slots[start:start + len(chunk)], device=self.device)
            with torch.cuda.stream(self._copy_stream):
                if self._released is not None:
                    self._copy_stream.wait_event(self._released)  # the last call has finished with these slots
                self.data.index_copy_(0, target, self._staging[:len(chunk)].to(self.device, non_blocking=True))
                if self.scales is not None:
                    assert self._staged_scales is not None, "staged with the staging buffer when there are scales"
                    staged = self._staged_scales[:len(chunk)].to(self.device, non_blocking=True)
                    self.scales.index_copy_(0, target, staged)
                self._copied = torch.cuda.Event()
                self._copied.record(self._copy_stream)
        assert self._copied is not None, "arrays is not empty: at least one copy was made"
        torch.cuda.current_stream(self.device).wait_event(self._copied)  # compute reads the slots after the copy

    # -- reading slots ---------------------------------------------------------------------------
    def weights(self, slots: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 transposed tiles ``[n, d, a]`` of ``slots`` (INT8 dequantized on the device), gathered
        into ``out`` (``[n, d, a]`` float32) when given, so a call allocates nothing."""
        if self.scales is None:
            return self.data[slots] if out is None else torch.index_select(self.data, 0, slots, out=out)
        q = self.data[slots]  # [n, d, a] int8
        out = q.to(torch.float32) if out is None else out.copy_(q)
        return out.mul_(self.scales[slots][:, None, :])

    def products(self, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y [n, a]``: tile ``slots[i]`` times input ``x[i]`` (``x [n, d]`` float32), ``y[i] = T x[i]``.

        float32: one fused gather-and-multiply (``embedding_bag`` over the rows of the transposed
        tiles, weighted by ``x``): it reads each tile once and writes no gathered copy. INT8: the
        INT8 tiles gathered, one ``bmm``, the per-row scales applied to the products.
        """
        n, d = x.shape
        if self.scales is None:
            a = self.tile_shape[0]
            table = self.data.view(-1, a)  # [slots·d, a]: row k of slot s is column k of its tile
            index = (slots[:, None] * d + torch.arange(d, device=self.device)).reshape(-1)  # [n·d]
            offsets = torch.arange(0, n * d, d, device=self.device)  # [n] one bag a tile
            return torch.nn.functional.embedding_bag(index, table, offsets, mode="sum",
                                                     per_sample_weights=x.reshape(-1))  # [n, a]
        y = torch.bmm(x[:, None, :], self.data[slots].to(torch.float32))[:, 0]  # [n, a]
        return y.mul_(self.scales[slots])

    def rows(self, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Single rows ``[n, d]``: row ``offsets[i]`` of slot ``slots[i]`` (INT8 dequantized)."""
        rows = self.data[slots, :, offsets]  # [n, d]
        if self.scales is None:
            return rows
        return rows.to(torch.float32).mul_(self.scales[slots, offsets][:, None])

    def clear(self) -> None:
        """Drop every tile (counted as evictions)."""
        self._counts["evictions"] += int((self.tile_of >= 0).sum())
        self.slot_of[:] = -1
        self.tile_of[:] = -1
        self.pinned[:] = False
        self._used = 0

    def close(self) -> None:
        """Drop every tile and stop the reader threads."""
        self.clear()
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
