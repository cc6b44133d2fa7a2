"""The low-VRAM runtime: route each token, load only the selected tiles, combine the pipes.

For a batch of tokens ``x [B, d_in]`` and each pipe ``p`` of the adapter:

1. route every token through the pipe's gate (:func:`prismoe_store.gates.routing.route_scores`; every
   pipe's scores in one product a call; a uniform zero gate when the adapter has none): ``K``
   selected workers and their weights per token;
2. make the union of the selected tiles resident in the pipe's
   :class:`~prismoe_store.runtime.slot_pool.SlotPool` (preallocated device slots, LRU inside the byte
   budget; misses come from the :class:`~prismoe_store.runtime.host_tier.HostTier` or the store), in groups
   that fit it;
3. multiply in a few batched kernels per group (a grouped GEMM). On the CPU the ``B·K`` (token,
   tile) pairs are sorted by the slot of their tile and multiplied in one jagged
   ``grouped_mm(x [P, b], slots [S, b, a])`` straight over the slot arena (float32; INT8 over the
   group's dequantized tiles): no gathered copy of the tiles, no padded rows; only the tokens'
   input slices are gathered, in cache-sized runs of slots (``CHUNK_BYTES``). Elsewhere (CUDA,
   where ``grouped_mm`` wants bf16) the pairs are grouped by tile, tiles of similar token counts
   padded to a common count, and the gathered inputs ``[G, m, b]`` multiplied by the gathered
   (transposed) tiles ``[G, b, a]`` in one ``bmm``; when every tile serves one token (decoding)
   one fused gather-and-multiply over the slots does it without a gathered copy. The weighted
   products are scatter-added into the (token, band) output rows;
4. ``y = Σ_p α_p y_p``, truncated to ``d_out``. Pipes run forward on even calls and backward on
   odd ones, so the last pipe's tiles are reused first when pipes share the budget; the sum is
   always taken in pipe order. Within a band, tiles are added in the order they were computed,
   so two calls on the same input may differ in the last bits (never beyond float32 rounding)
   when the cache held different tiles.

Device memory: one arena of ``cache_bytes`` holds every pipe's slots. ``schedule="parallel"``
gives each pipe a share of it proportional to its tile bytes (every pipe's tiles stay resident across
calls when the budget holds them all); ``"serial"`` — and any budget too small for a slot per
pipe — lets the pipes take turns in the whole arena: a pipe's tiles leave before the next pipe's
arrive, so the cache never holds more than one pipe's tiles. Any budget that holds one tile works
(smaller budgets stream tiles through the slots). Gates stay on the device outside the tile
budget (``[workers, d_in]`` floats a pipe); reused gather buffers (at most ``GATHER_BYTES`` of tiles,
about ``CHUNK_BYTES`` of input slices) too.

>>> import numpy as np, torch
>>> from prismoe_store.stores.adapter import AdapterStore
>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(6, 10, 8)
>>> a = AdapterStore.create("memory://doc-runtime", grids=[g], overwrite=True, attrs={"complete": True})
>>> w = np.zeros(g.padded_shape, np.float32); w[:10, :6] = np.arange(60).reshape(10, 6)
>>> for r in range(g.rows): a.write_band(0, r, w[r * g.tile_out:(r + 1) * g.tile_out])
>>> rt = Runtime(a, RuntimeConfig())
>>> x = torch.ones(2, 3, 6)
>>> y = rt(x); y.shape, bool(torch.allclose(y, x @ torch.from_numpy(w[:10, :6]).T))
(torch.Size([2, 3, 10]), True)
>>> rt.stats()["cache"]["misses"] == g.active_count
True
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from prismoe_store.errors import CacheError, IncompleteStoreError
from prismoe_store.gates.routing import active_mask, k_for, route_scores
from prismoe_store.grid import GridSpec
from prismoe_store.runtime.config import (
    CHUNK_BYTES,
    DEFAULT_SPARSITY,
    GATHER_BYTES,
    HEAT_DECAY,
    RuntimeConfig,
    host_budget,
    input_rows,
)
from prismoe_store.runtime.host_tier import HostTier, hot_tiles
from prismoe_store.runtime.quant import int8_ready
from prismoe_store.runtime.slot_pool import PoolStats, SlotPool, new_arena, slot_bytes
from prismoe_store.runtime.tile_source import TileSource
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.records import GatesRecord


class Runtime:
    """A callable ``[..., d_in] → [..., d_out]`` over an adapter (see the module docstring)."""

    def __init__(self, source: TileSource, config: RuntimeConfig):
        if isinstance(source, AdapterStore) and not source.complete:
            raise IncompleteStoreError(f"adapter {source.url} is not finished: re-run `prismoe fit` to complete it")
        if config.quant == "int8" and not int8_ready(source):
            raise IncompleteStoreError("the adapter has no finished INT8 tiles: run `prismoe quantize` first")
        self.source = source  # where tiles and gates come from (the TileSource protocol)
        self.config = config  # the settings
        self.device = torch.device(config.device)
        self.d_in, self.d_out = int(source.d_in), int(source.d_out)
        self.grids: list[GridSpec] = list(source.grids)  # one grid per pipe
        self.alphas: list[float] = list(source.alphas)  # pipe weights, sum 1
        self.fit_mode: str = source.mode  # the adapter's "joint" or "independent": how tile weights combine
        raw_gates = [source.read_gate(p) for p in range(len(self.grids))]
        self.gates = [self._gate(p, g) for p, g in enumerate(raw_gates)]  # per pipe: (weight [W, M], bias [W])
        self.gate_weight = torch.cat([w for w, _ in self.gates])  # [ΣW, M] every pipe's gate: one product a call
        self.gate_bias = torch.cat([torch.where(active_mask(g, self.device), b, float("-inf"))
                                    for g, (_, b) in zip(self.grids, self.gates, strict=True)])  # [ΣW], padding -inf
        self.gate_ends = np.cumsum([g.workers for g in self.grids])  # [P] end of each pipe's columns
        self.sparsity, self.temperature = self._routing_settings(config.sparsity, any(g is not None for g in raw_gates))
        self.total_bytes = sum(g.active_count * self.entry_bytes(p) for p, g in enumerate(self.grids))
        self.budget_bytes = int(config.cache_bytes or self.total_bytes)  # device bytes of every pipe's slots
        self._check_budget()
        self.host = HostTier(host_budget(config, self.device, self.total_bytes), self._read)  # decompressed tiles
        self.prefetch = self.host.budget_bytes > 0 if config.prefetch is None else bool(config.prefetch)
        self.heat = [np.zeros(g.workers) for g in self.grids]  # per pipe: decayed selection counts
        self.pools, self.shared = self._pools()  # per pipe: SlotPool; shared: pipes take turns in one arena
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}  # (what, pipe): reused gather buffers
        self.jagged = self.device.type == "cpu"  # jagged grouped_mm (CPU); else padded bmm buckets
        self._peak = 0
        self._seconds, self._tokens, self._calls = 0.0, 0, 0
        self._turn = 0  # calls so far (never reset): even turns run the pipes forward, odd backward

    # -- setup -----------------------------------------------------------------------------------
    def entry_bytes(self, pipe: int) -> int:
        """Cache bytes of one of the pipe's tiles: float32 tile, or INT8 tile plus float32 scales."""
        return slot_bytes(self.grids[pipe].tile_shape, self.config.quant)

    def _check_budget(self) -> None:
        biggest = max(self.entry_bytes(p) for p in range(len(self.grids)))
        if biggest > self.budget_bytes:
            raise CacheError(f"the cache budget of {self.budget_bytes} bytes is smaller than one tile "
                             f"({biggest} bytes): raise --cache-mb to at least {biggest / 2**20:.3f}")

    def _pools(self) -> tuple[list[SlotPool], bool]:
        """One slot pool per pipe, laid out in one arena of ``budget_bytes``: side by side (a share
        proportional to the pipe's tile bytes) with the parallel schedule when every pipe gets a slot, else
        each pipe over the whole arena (they take turns)."""
        need = [g.active_count * self.entry_bytes(p) for p, g in enumerate(self.grids)]
        shares = [self.budget_bytes * n // sum(need) // 4 * 4 for n in need]  # 4-byte aligned regions
        shared = self.config.schedule == "serial" or any(s < self.entry_bytes(p) + 4 for p, s in enumerate(shares))
        if self.budget_bytes >= sum(need) + 4 * len(need):
            shares = [n + 4 for n in need]  # room for every tile of every pipe (and INT8 scale alignment)
        size = min(self.budget_bytes, max(need) + 4) if shared else sum(shares)
        arena = new_arena(size, self.device)
        pools, start = [], 0
        for p, g in enumerate(self.grids):
            region = arena if shared else arena[start:start + shares[p]]
            start += shares[p]
            pools.append(SlotPool(n_tiles=g.workers, tile_shape=g.tile_shape, budget_bytes=region.numel(),
                                  arena=region, load=self._loader(p), quant=self.config.quant,
                                  device=self.device, heat=self.heat[p] if self.config.eviction == "heat" else None))
        return pools, shared

    def _loader(self, p: int) -> Callable[[int], tuple[np.ndarray, ...]]:
        """Pipe ``p``'s tile reader for its slot pool: through the host tier."""
        return lambda j: self.host.get((p, j))

    def _read(self, key: tuple[int, int]) -> tuple[np.ndarray, ...]:
        p, j = key
        if self.config.quant == "int8":
            return tuple(self.source.read_tile_int8(p, j))  # (int8 [a, b], float32 [a])
        return (self.source.read_tile(p, j),)  # (float32 [a, b],)

    def _gate(self, pipe: int, gate) -> tuple[torch.Tensor, torch.Tensor]:
        workers = self.grids[pipe].workers
        if gate is None:  # uniform gate: every active worker scores 0 (all weights 1 at ρ = 1)
            return (torch.zeros(workers, self.d_in, device=self.device),
                    torch.zeros(workers, device=self.device))
        weight, bias = gate
        return (torch.as_tensor(np.asarray(weight, np.float32), device=self.device),
                torch.as_tensor(np.asarray(bias, np.float32), device=self.device))

    def _routing_settings(self, sparsity: float | None, has_gates: bool) -> tuple[float, float]:
        gates = self.source.attrs().get("gates")
        trained = GatesRecord.from_dict(gates).settings if gates else {}  # what `prismoe fit-gates` recorded
        temperature = float(trained.get("temperature", 1.0))
        if sparsity is not None:
            return float(sparsity), temperature
        if "sparsity" in trained:
            return float(trained["sparsity"]), temperature
        return (DEFAULT_SPARSITY if has_gates else 1.0), temperature

    # -- the forward pass ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x) -> torch.Tensor:
        """Map ``x [..., d_in]`` (torch or numpy) to float32 ``y [..., d_out]`` on the runtime's device."""
        t0 = time.perf_counter()
        x, lead = input_rows(x, self.d_in, self.device)  # [B, M]
        ys: dict[int, torch.Tensor] = {}  # per pipe: [B, N]
        s = torch.addmm(self.gate_bias, x, self.gate_weight.T)  # [B, ΣW] every pipe's gate scores
        for p in self._pipe_order():
            if self.shared:  # the other pipes' slots are this pipe's now
                for q, pool in enumerate(self.pools):
                    if q != p:
                        pool.clear()
            lo = self.gate_ends[p] - self.grids[p].workers
            ys[p] = self._pipe(p, x, s[:, lo:self.gate_ends[p]])[:, : self.d_out]  # [B, N]
        y = ys[0] * self.alphas[0]  # [B, N], summed in pipe order, in place
        for p in range(1, len(self.alphas)):
            y.add_(ys[p] * self.alphas[p])
        if self.prefetch:
            self._prefetch()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._seconds += time.perf_counter() - t0
        self._tokens += x.shape[0]
        self._calls += 1
        return y.reshape(*lead, self.d_out)

    def _pipe_order(self) -> list[int]:
        """Pipes forward on even calls, backward on odd ones ("zigzag"): when pipes take turns in one
        arena, the pipe that ran last is still resident when the next call starts."""
        order = list(range(len(self.grids)))
        self._turn += 1
        return order if self._turn % 2 == 1 else order[::-1]

    def _pipe(self, p: int, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One pipe's output ``[B, N_pad]`` for tokens ``x [B, M]`` (gate scores ``s [B, W]``): a grouped
        GEMM over the union of the selected tiles."""
        grid, pool = self.grids[p], self.pools[p]
        R, C, (a, b) = grid.rows, grid.cols, grid.tile_shape
        r = route_scores(s, grid=grid, sparsity=self.sparsity, mode=self.fit_mode, temperature=self.temperature)
        B, K = r.indices.shape  # r.indices, r.weights: [B, K]
        xs = F.pad(x, (0, grid.d_in_pad - self.d_in)).view(B, C, b)  # [B, C, b] input slices, zero padding
        if B == 1:
            return self._decode(p, xs[0], r.indices[0], r.weights[0])

        # the B*K (token, tile) pairs grouped by tile
        tile = r.indices.reshape(-1)  # [B*K]
        counts = torch.bincount(tile, minlength=grid.workers).cpu().numpy()  # [W] tokens per tile (host)
        self.heat[p] *= HEAT_DECAY  # in place: the pool ranks evictions by it
        self.heat[p] += counts

        union = np.flatnonzero(counts)  # [U] tiles any token chose
        union = union[np.argsort(~pool.resident(union), kind="stable")]  # resident first: used before loads evict
        out = torch.zeros(B * R, a, device=self.device)  # [(token, band), a] output rows
        if self.jagged and a % 4 == 0 and b % 4 == 0:  # grouped_mm takes rows of whole 16-byte units
            self._jagged(p, union, counts, tile, r.weights.reshape(-1), K, xs, out)
            return out.view(B, R * a)  # [B, N_pad]
        order = torch.argsort(tile, stable=True)  # [B*K] pairs, grouped by tile
        token = torch.div(order, K, rounding_mode="floor")  # [B*K] the token of each grouped pair
        weight = r.weights.reshape(-1)[order]  # [B*K]
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [W] first grouped pair of each tile
        step = max(1, min(pool.slots, GATHER_BYTES // (4 * a * b)))
        try:
            for start in range(0, len(union), step):
                group = union[start:start + step]
                group = group[np.argsort(-counts[group], kind="stable")]  # [G] most-chosen first: buckets
                slots = pool.acquire(group)  # [G]
                if counts[group[0]] == 1:  # one token a tile: fused products, no gathered copy
                    self._single(pool, slots, group, first, token, weight, xs, out, grid)
                else:
                    tiles = pool.weights(slots, out=self._buffer(p, len(group)))  # [G, b, a] transposed
                    for lo, hi in _buckets(counts[group]):  # tiles with similar token counts, padded together
                        self._grouped(tiles[lo:hi], group[lo:hi], counts, first, token, weight, xs, out, grid)
                self._peak = max(self._peak, sum(q.used_bytes for q in self.pools))
                pool.release()
        finally:
            pool.release()
        return out.view(B, R * a)  # [B, N_pad]

    def _jagged(self, p: int, union: np.ndarray, counts: np.ndarray, tile: torch.Tensor, weight: torch.Tensor,
                K: int, xs: torch.Tensor, out: torch.Tensor) -> None:
        """The ``B·K`` (token, tile) pairs ``tile [B*K]`` (weights ``weight [B*K]``) of the tiles ``union [U]``
        (host, in acquisition order) as one jagged grouped GEMM per group of tiles that fits the pool:
        the pairs sorted by slot, ``grouped_mm(x [P, b], slots [S, b, a])`` straight over the slot arena
        (float32: no gathered copy of the tiles, no padded rows; INT8: over the group's dequantized
        tiles), the weighted products added into ``out [(token, band), a]``."""
        grid, pool = self.grids[p], self.pools[p]
        R, C, (a, b) = grid.rows, grid.cols, grid.tile_shape
        dev = self.device
        pos = torch.empty(grid.workers, dtype=torch.int64, device=dev)  # [W] tile -> place in union
        pos[torch.as_tensor(union, device=dev)] = torch.arange(len(union), device=dev)
        in_union = torch.argsort(pos[tile], stable=True)  # [B*K] pairs in union order
        ends = np.cumsum(counts[union])  # [U] end of each union tile's pairs
        step = pool.slots if pool.scales is None else max(1, min(pool.slots, GATHER_BYTES // (4 * a * b)))
        try:
            for start in range(0, len(union), step):
                group = union[start:start + step]  # [G]
                slots = pool.acquire(group)  # [G]
                lo, hi = (ends[start - 1] if start else 0), ends[start + len(group) - 1]
                pairs = in_union[lo:hi]  # [P] the group's pairs
                if pool.scales is None:  # float32: multiply in the arena, groups by slot
                    mat, key = pool.data, slots  # [S, b, a], [G]
                else:  # INT8: the group's tiles dequantized, groups by place in the group
                    mat, key = pool.weights(slots, out=self._buffer(p, len(group))), torch.arange(len(group))
                key, perm = torch.sort(key.to(dev)[pos[tile[pairs]] - start], stable=True)  # [P]
                pairs = pairs[perm]  # [P] sorted by the slot (or place) of their tile
                j, tok = tile[pairs], pairs // K  # [P] tile and token of each pair
                ends_of = torch.bincount(key, minlength=mat.shape[0]).cumsum(0)  # [S] end of each slot's pairs
                self._products(p, mat, ends_of, tok * C + j % C, tok * R + j // C, weight[pairs], xs.view(-1, b), out)
                self._peak = max(self._peak, sum(q.used_bytes for q in self.pools))
                pool.release()
        finally:
            pool.release()

    def _products(self, p: int, mat: torch.Tensor, ends: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  w: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """``out[dst[i]] += w[i] · rows[src[i]] @ mat[s]`` for the pairs ``i`` of each slot ``s`` (pairs
        sorted by slot, ``ends [S]`` the end of each slot's pairs; ``mat [S, b, a]``, ``rows [n, b]``,
        ``out [m, a]``): ``grouped_mm`` over runs of slots whose gathered rows and products fit
        ``CHUNK_BYTES``, so both stay in cache and no call allocates a large tensor afresh."""
        S, b, a = mat.shape
        per = max(1, CHUNK_BYTES // (4 * (a + b)))  # pairs a run
        ends_h = ends.cpu().numpy()  # [S] (host)
        cuts = np.unique(np.searchsorted(ends_h, np.arange(per, int(ends_h[-1]), per), side="left"))  # [n] run ends
        lo_slot, lo = 0, 0
        for hi_slot in [*(cuts + 1).tolist(), S]:
            hi = int(ends_h[hi_slot - 1]) if hi_slot > lo_slot else lo
            if hi == lo:
                continue
            xg = torch.index_select(rows, 0, src[lo:hi], out=self._scratch(("x", p), hi - lo, b))  # [n, b]
            offs = (ends[lo_slot:hi_slot] - lo).to(torch.int32)  # [s] ends of the run's groups
            if b <= a:  # weight the narrower side: the input slices ...
                y = F.grouped_mm(xg.mul_(w[lo:hi, None]), mat[lo_slot:hi_slot], offs=offs)  # [n, a]
            else:  # ... or the tile outputs
                y = F.grouped_mm(xg, mat[lo_slot:hi_slot], offs=offs).mul_(w[lo:hi, None])  # [n, a]
            out.index_add_(0, dst[lo:hi], y)
            lo_slot, lo = hi_slot, hi

    def _grouped(self, tiles, group, counts, first, token, weight, xs, out, grid) -> None:
        """``out[(t, band)] += w · T_j x_{t, col}`` for every pair of the tiles ``group [G]`` (host)."""
        R, C = grid.rows, grid.cols
        m = int(counts[group[0]])  # the bucket's largest count: every tile padded to m tokens
        g = torch.as_tensor(group, device=self.device)
        n = torch.as_tensor(counts[group], device=self.device)  # [G]
        ar = torch.arange(m, device=self.device)  # [m]
        valid = ar[None, :] < n[:, None]  # [G, m]
        pair = torch.as_tensor(first[group], device=self.device)[:, None] + ar  # [G, m] grouped pair ids
        pair = torch.where(valid, pair, 0)
        tok = token[pair]  # [G, m] tokens (padding: token of pair 0, weight 0)
        w = weight[pair].masked_fill_(~valid, 0.0)  # [G, m]
        xg = xs[tok, (g % C)[:, None]]  # [G, m, b] each pair's input slice
        if xg.shape[-1] <= tiles.shape[2]:  # weight the narrower side: the input slices ...
            y = torch.bmm(xg.mul_(w[..., None]), tiles)  # [G, m, a]
        else:  # ... or the tile outputs
            y = torch.bmm(xg, tiles).mul_(w[..., None])  # [G, m, a]
        out.index_add_(0, (tok * R + (g // C)[:, None]).reshape(-1), y.reshape(-1, y.shape[-1]))

    def _decode(self, p: int, xs: torch.Tensor, tiles: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token (decoding): its ``K`` tiles (``tiles [K]``, ``weights [K]``; input slices
        ``xs [C, b]``) in fused passes over the slots, resident tiles first. Returns ``[1, N_pad]``."""
        grid, pool = self.grids[p], self.pools[p]
        R, C, a = grid.rows, grid.cols, grid.tile_out
        ids = tiles.cpu().numpy()  # [K] distinct (top-k)
        self.heat[p] *= HEAT_DECAY
        self.heat[p][ids] += 1
        order = np.argsort(~pool.resident(ids), kind="stable")  # resident first
        ids, pos = ids[order], torch.as_tensor(order, device=self.device)
        out = torch.zeros(R, a, device=self.device)  # [R, a] output bands
        try:
            for start in range(0, len(ids), pool.slots):
                slots = pool.acquire(ids[start:start + pool.slots])  # [G]
                g = tiles[pos[start:start + pool.slots]]  # [G] the same tiles, on the device
                w = weights[pos[start:start + pool.slots]]  # [G]
                out.index_add_(0, g // C, pool.products(slots, xs[g % C] * w[:, None]))  # [G, a] into bands
                self._peak = max(self._peak, sum(q.used_bytes for q in self.pools))
                pool.release()
        finally:
            pool.release()
        return out.view(1, R * a)

    def _single(self, pool, slots, group, first, token, weight, xs, out, grid) -> None:
        """Tiles chosen by one token each (decoding): ``out[(t, band)] += T_j (w · x_{t, col})`` in one
        fused pass over the tiles (:meth:`SlotPool.products`)."""
        R, C = grid.rows, grid.cols
        g = torch.as_tensor(group, device=self.device)
        pair = torch.as_tensor(first[group], device=self.device)  # [G] each tile's one pair
        tok = token[pair]  # [G]
        y = pool.products(slots, xs[tok, g % C] * weight[pair][:, None])  # [G, a]
        out.index_add_(0, tok * R + g // C, y)

    def _buffer(self, p: int, n: int) -> torch.Tensor:
        """A reused float32 buffer of ``n`` gathered (transposed) tiles of pipe ``p`` ``[n, b, a]``."""
        a, b = self.grids[p].tile_shape
        return self._scratch(("tiles", p), n, b, a)

    def _scratch(self, key: tuple[str, int], n: int, *shape: int) -> torch.Tensor:
        """A reused float32 buffer ``[n, *shape]`` (grown when too small): a call allocates no large
        tensor whose pages the system would fault in afresh every time."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != shape:
            buf = self._buffers[key] = torch.empty(n, *shape, device=self.device)
        return buf[:n]

    def _prefetch(self) -> None:
        """Read the hottest tiles that are not on the device into the host tier (background)."""
        for p, pool in enumerate(self.pools):
            k = k_for(self.sparsity, self.grids[p].active_count)
            self.host.prefetch((p, int(j)) for j in hot_tiles(self.heat[p], pool.slot_of >= 0, k))

    # -- statistics and lifetime -----------------------------------------------------------------
    def stats(self) -> dict:
        """Cache counters and timing since the last :meth:`reset_stats`.

        Keys: ``cache`` (the device slots: hits, misses, evictions, bytes_loaded, peak_bytes,
        budget_bytes, used_bytes, tiles, slots, hit_rate), ``host`` (the host tier: hits, misses,
        prefetched, prefetch_hits, prefetch_hit_rate, evictions, bytes, budget_bytes), ``seconds``
        (time inside calls), ``tokens``, ``calls``, ``device``, ``schedule``, ``quant``, ``sparsity``,
        ``total_bytes`` (every non-padding tile).
        """
        cache = PoolStats.combine([q.stats() for q in self.pools], peak_bytes=self._peak,
                                  budget_bytes=self.budget_bytes)
        return {"cache": cache.to_dict(), "host": self.host.stats(), "seconds": self._seconds,
                "tokens": self._tokens, "calls": self._calls, "device": str(self.device),
                "schedule": self.config.schedule,
                "quant": self.config.quant or "fp32", "sparsity": self.sparsity, "total_bytes": self.total_bytes}

    def reset_stats(self) -> None:
        """Zero the counters and the timer (resident tiles stay: the cache stays warm)."""
        for q in self.pools:
            q.reset_stats()
        self.host.reset_stats()
        self._peak = sum(q.used_bytes for q in self.pools)
        self._seconds, self._tokens, self._calls = 0.0, 0, 0

    def clear(self) -> None:
        """Drop every tile from the device slots (the next call starts from a cold cache)."""
        for q in self.pools:
            q.clear()

    def close(self) -> None:
        """Free the slots and stop the reader threads."""
        for q in self.pools:
            q.close()
        self.host.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _buckets(counts: np.ndarray) -> list[tuple[int, int]]:
    """Cut ``counts`` (descending) into runs ``[lo, hi)`` whose counts are at least half the run's
    first: padding every tile of a run to its largest count at most doubles the run's work.

    >>> _buckets(np.array([8, 7, 5, 4, 2, 1, 1]))
    [(0, 4), (4, 7)]
    """
    out, lo = [], 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or 2 * counts[i] < counts[lo]:
            out.append((lo, i))
            lo = i
    return out
