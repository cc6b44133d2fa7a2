"""The runtime of head adapters: gate the bands, compute only the selected ones, fill the rest −inf.

For tokens ``x [B, d]`` over a ``partition`` adapter of ``n`` bands of ``a`` rows (DESIGN §5, §8):

1. gate scores ``s = x W_gᵀ + b_g`` ``[B, n]``; ``K = ceil(ρ · n)`` bands per token, or with a mass
   threshold ``m`` the fewest bands whose predicted mass ``softmax(s)`` reaches ``m`` (at most
   ``ceil(ρ · n)``, at least one);
2. the union of the selected bands is made resident in the :class:`~prismoe_store.runtime.slot_pool.SlotPool`
   (misses come from the :class:`~prismoe_store.runtime.host_tier.HostTier` or the store; in groups that
   fit the pool and a bounded gather buffer) and multiplied in one batched kernel per group: for a
   token or two, only each token's own bands in one fused gather-and-multiply
   (:meth:`~prismoe_store.runtime.slot_pool.SlotPool.products`); for more, every token times the union's
   bands, ``bmm([G, B, d], [G, d, a])``;
3. a token's logits are exact on its own selected bands and ``fill`` (−inf) elsewhere, so an
   unselected token never wins an argmax or takes probability mass; the columns go back from the
   adapter's row order to token order.

With ρ = 1 every band is computed: the logits equal ``x @ Wᵀ`` of the source matrix (bit for bit
on the CPU). The runtime counts what it read: band bytes (true rows) and gate bytes per token.

>>> import numpy as np, torch, tempfile, os
>>> from prismoe_store.head.build import HeadConfig, build_head
>>> d = tempfile.mkdtemp(); w = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
>>> np.save(os.path.join(d, "w.npy"), w)
>>> _ = build_head(os.path.join(d, "w.npy"), os.path.join(d, "h.zarr"), config=HeadConfig(band_rows=8))
>>> rt = SelectRuntime(AdapterStore.open(os.path.join(d, "h.zarr")), RuntimeConfig(sparsity=1.0))
>>> x = torch.randn(3, 8)
>>> bool(torch.equal(rt(x), x @ torch.from_numpy(w).T))
True
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from prismoe_store.errors import DataError, IncompleteStoreError
from prismoe_store.grid import band_sizes
from prismoe_store.runtime.grouped import GATHER_BYTES, HEAT_DECAY, RuntimeConfig, host_budget, input_rows
from prismoe_store.runtime.host_tier import HostTier, hot_tiles
from prismoe_store.runtime.quant import int8_ready
from prismoe_store.runtime.slot_pool import SlotPool
from prismoe_store.runtime.tile_source import BandSource
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.records import GatesRecord

DEFAULT_HEAD_SPARSITY = 0.1  # ρ for head adapters whose gate training recorded none
BAG_BATCH = 2  # at most this many tokens: per-pair fused products; more: one product over the union
DEFAULT_MASS_CAP = 0.25  # most bands a token may take with a mass threshold, when no ρ is given


class BandRouter:
    """Per token, the bands to compute: the top ``K = ceil(ρ · n)`` gate scores, or with a mass
    threshold ``m`` the fewest of them whose predicted mass ``softmax(s)`` reaches ``m``.

    >>> r = BandRouter((np.eye(3, dtype=np.float32), np.zeros(3, np.float32)), sparsity=0.5)
    >>> bands, valid = r(torch.tensor([[0.0, 5.0, 1.0]]))
    >>> bands.tolist(), valid.tolist()
    ([[1, 2]], [[True, True]])
    >>> BandRouter((np.eye(3, dtype=np.float32), np.zeros(3, np.float32)), sparsity=1.0, mass=0.9)(
    ...     torch.tensor([[0.0, 9.0, 1.0]]))[1].tolist()
    [[True, False, False]]
    """

    def __init__(self, gate: tuple[np.ndarray, np.ndarray], *, sparsity: float, mass: float | None = None,
                 device: str | torch.device = "cpu"):
        self.weight = torch.as_tensor(gate[0], device=device)  # [n, d]
        self.bias = torch.as_tensor(gate[1], device=device)  # [n]
        self.n_bands = int(self.weight.shape[0])
        self.k_max = max(1, math.ceil(sparsity * self.n_bands))  # bands per token (the cap with a mass)
        self.mass = mass  # predicted-mass threshold, or None for a fixed K

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bands [B, K], valid [B, K])``: highest-scoring bands, best first, and which are taken."""
        scores = torch.addmm(self.bias, x, self.weight.T)  # [B, n]
        top = torch.topk(scores, self.k_max, dim=1)  # [B, K]
        if self.mass is None:
            return top.indices, torch.ones_like(top.indices, dtype=torch.bool)
        p = torch.softmax(scores, dim=1)  # [B, n] predicted band mass
        cum = torch.gather(p, 1, top.indices).cumsum(dim=1)  # [B, K]
        before = cum - torch.gather(p, 1, top.indices)  # mass of the better bands
        return top.indices, before < self.mass  # take a band while the better ones fall short of m

    def chosen(self, x: torch.Tensor) -> torch.Tensor:
        """Mask ``[B, n]`` of the bands each token takes."""
        bands, valid = self(x)
        mask = torch.zeros(x.shape[0], self.n_bands, dtype=torch.bool, device=x.device)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(bands)
        mask[rows[valid], bands[valid]] = True
        return mask


class SelectRuntime:
    """A callable ``hidden [..., d] → logits [..., V]`` over a head adapter (module docstring).

    ``config.sparsity`` is ρ (the share of bands computed per token, or the cap with
    ``config.mass``); ``config.cache_bytes`` the pool budget (default: every band).
    """

    def __init__(self, source: BandSource, config: RuntimeConfig):
        if isinstance(source, AdapterStore) and not source.complete:
            raise IncompleteStoreError(f"head adapter {source.url} is not finished: re-run `prismoe head`")
        if config.quant == "int8" and not int8_ready(source):
            raise IncompleteStoreError("the adapter has no finished INT8 tiles: run `prismoe quantize` first")
        self.source, self.config = source, config
        self.device = torch.device(config.device)
        self.d_in, self.d_out = int(source.d_in), int(source.d_out)
        self.band_rows, self.n_bands = int(source.band_rows), int(source.n_bands)
        gate = source.read_band_gate()
        if gate is None:
            raise IncompleteStoreError("the head adapter has no band gate: re-run `prismoe head`")
        order = torch.as_tensor(source.read_order(), device=self.device)  # [V] adapter row -> token
        self.position = torch.empty_like(order)  # [V] token -> adapter row
        self.position[order] = torch.arange(self.d_out, device=self.device)
        self.mass = config.mass
        self.sparsity = self._sparsity(config)
        self.router = BandRouter(gate, sparsity=self.sparsity, mass=self.mass, device=self.device)
        last = self.d_out - self.band_rows * (self.n_bands - 1)
        self.total_bytes = self._all_bytes(self.d_out)  # every band, true bytes
        self.host = HostTier(host_budget(config, self.device, self.total_bytes), self._read)  # decompressed bands
        self.prefetch = self.host.budget_bytes > 0 if config.prefetch is None else bool(config.prefetch)
        self.heat = np.zeros(self.n_bands)  # decayed selection counts per band (eviction and prefetch rank by them)
        self.pool = SlotPool(n_tiles=self.n_bands, heat=self.heat if config.eviction == "heat" else None,
                             tile_shape=(self.band_rows, self.d_in), quant=config.quant,
                             budget_bytes=config.cache_bytes or self._all_bytes(self.n_bands * self.band_rows),
                             load=self.host.get, device=self.device,
                             tile_rows=band_sizes(self.d_out, self.band_rows))
        self.token_of_row = torch.full((self.n_bands * self.band_rows,), self.d_out, dtype=torch.int64,
                                       device=self.device)  # [n·a] token id of each slot row (V: no token)
        self.token_of_row[:self.d_out] = order
        self._gathered: torch.Tensor | None = None  # reused buffer of gathered band tiles
        self.band_sizes = torch.full((self.n_bands,), self.band_rows, dtype=torch.int64, device=self.device)  # [n]
        self.band_sizes[-1] = last
        self._seconds, self._tokens, self._calls, self._bands, self._rows = 0.0, 0, 0, 0, 0

    def _read(self, band: int) -> tuple[np.ndarray, ...]:
        if self.config.quant == "int8":
            return tuple(self.source.read_band_int8(band))  # (int8 [rows, d], float32 [rows])
        return (self.source.read_band_tiles(band),)  # (float32 [rows, d],)

    def _all_bytes(self, rows: int) -> int:
        """Bytes of ``rows`` rows of tiles (INT8: one byte a value plus a float32 scale per row)."""
        int8 = self.config.quant == "int8"
        return rows * (self.d_in * (1 if int8 else 4) + (4 if int8 else 0))

    def _sparsity(self, config: RuntimeConfig) -> float:
        if config.sparsity is not None:
            return float(config.sparsity)
        gates = self.source.attrs().get("gates")
        trained = GatesRecord.from_dict(gates).settings if gates else {}
        if config.mass is not None:
            return float(trained.get("mass_cap", DEFAULT_MASS_CAP))
        return float(trained.get("sparsity", DEFAULT_HEAD_SPARSITY))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's bands and which it takes: see :class:`BandRouter`."""
        return self.router(x)

    # -- the forward pass ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x) -> torch.Tensor:
        """Map ``x [..., d]`` (torch or numpy) to float32 logits ``[..., V]`` in token order."""
        t0 = time.perf_counter()
        x, lead = input_rows(x, self.d_in, self.device)  # [B, d]
        bands, valid = self.route(x)  # [B, K], [B, K]
        logits = self.logits_for(x, bands, valid)  # [B, V]
        if self.prefetch:  # the hottest bands not on the device, into the host tier (background)
            self.host.prefetch(int(b) for b in hot_tiles(self.heat, self.pool.slot_of >= 0, self.router.k_max))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._seconds += time.perf_counter() - t0
        self._tokens += x.shape[0]
        self._calls += 1
        self._bands += int(valid.sum())
        self._rows += int(self.band_sizes[bands][valid].sum())
        return logits.reshape(*lead, self.d_out)

    def logits_for(self, x: torch.Tensor, bands: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (token order) exact on each token's valid selected bands, ``-inf`` elsewhere."""
        B, a, n = x.shape[0], self.band_rows, self.n_bands
        chosen = torch.zeros(B, n, dtype=torch.bool, device=self.device)  # [B, n] band taken by token
        rows = torch.arange(B, device=self.device)[:, None].expand_as(bands)
        chosen[rows[valid], bands[valid]] = True
        counts = chosen.sum(dim=0)  # [n] tokens per band
        union = torch.nonzero(counts).squeeze(1)  # [U] bands any token took
        self.heat *= HEAT_DECAY  # in place: the pool ranks evictions by it
        self.heat += counts.cpu().numpy()
        if len(union) == n and self.pool.slots >= n:  # every band: one product over the matrix in token order,
            return self._all_bands(x, chosen)  # the very product x @ Wᵀ (bit for bit)
        out = torch.full((B, self.d_out), float("-inf"), device=self.device)  # [B, V] token order
        union_np = union.cpu().numpy()
        # resident bands first: they are used before new loads could evict them
        union_np = union_np[np.argsort(~self.pool.resident(union_np), kind="stable")]
        step = max(1, min(self.pool.slots, GATHER_BYTES // (4 * a * self.d_in)))
        every = bool(chosen.all())  # each token took every band (a band cache too small for all of them)
        try:
            for start in range(0, len(union_np), step):
                group = union_np[start:start + step]  # [G]
                g = torch.as_tensor(group, device=self.device)
                slots = self.pool.acquire(group)  # [G]
                short = bool(group.max() == n - 1 and self.band_sizes[-1] < a)  # the short last band is in
                if every:  # every token takes every band (ρ = 1): rows in W's layout, the dense product's kernel
                    self._in_w_layout(x, g, slots, out, short)
                elif B <= BAG_BATCH:
                    self._pairs(x, chosen[:, g], g, slots, out, short)
                else:
                    self._union(x, chosen[:, g], g, slots, out, short)
                self.pool.release()
        finally:
            self.pool.release()
        return out

    def _in_w_layout(self, x, g, slots, out, short: bool) -> None:
        """Every token times every band of the group as ``x @ W_gᵀ`` with the rows in ``W``'s own
        layout, so the logits are bit for bit those of the dense product whatever the budget."""
        w = self.pool.weights(slots).transpose(1, 2).reshape(-1, self.d_in)  # [G·a, d] rows of W
        y = x @ w.T  # [B, G·a]
        tokens = self.token_of_row.view(self.n_bands, self.band_rows)[g].reshape(-1)  # [G·a]
        if short:
            real = tokens < self.d_out
            tokens, y = tokens[real], y[:, real]
        out.index_copy_(1, tokens, y)

    def _pairs(self, x, chosen, g, slots, out, short: bool) -> None:
        """Few tokens: each (token, selected band) pair's products in one fused pass over the tiles
        (no gathered copy), written into ``out [B, V]`` at the band's tokens."""
        t, j = torch.nonzero(chosen, as_tuple=True)  # [P] token and group position of each pair
        y = self.pool.products(slots[j], x[t])  # [P, a]
        tokens = self.token_of_row.view(self.n_bands, self.band_rows)[g[j]]  # [P, a] token of each row
        rows = t[:, None].expand_as(tokens)  # [P, a]
        if short:
            real = tokens < self.d_out
            rows, tokens, y = rows[real], tokens[real], y[real]
        out.index_put_((rows, tokens), y)

    def _union(self, x, chosen, g, slots, out, short: bool) -> None:
        """Many tokens: every token times every band of the group in one batched product, the
        tokens' unselected bands filled −inf, the columns written into ``out [B, V]``."""
        B, G, a = x.shape[0], len(g), self.band_rows
        w = self.pool.weights(slots, out=self._buffer(G))  # [G, d, a]
        y = torch.bmm(x.expand(G, B, self.d_in), w)  # [G, B, a]
        y = y.masked_fill_(~chosen.T[..., None], float("-inf")).permute(1, 0, 2).reshape(B, G * a)  # [B, G·a]
        tokens = self.token_of_row.view(self.n_bands, a)[g].reshape(-1)  # [G·a] token of each computed row
        if short:
            real = tokens < self.d_out
            tokens, y = tokens[real], y[:, real]
        out.index_copy_(1, tokens, y)

    def _buffer(self, bands: int) -> torch.Tensor:
        """A reused float32 buffer for ``bands`` gathered (transposed) band tiles ``[bands, d, a]``."""
        if self._gathered is None or self._gathered.shape[0] < bands:
            self._gathered = torch.empty(bands, self.d_in, self.band_rows, device=self.device)
        return self._gathered[:bands]

    def _all_bands(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` when the union is every band: rows gathered back into token order, one
        ``x @ Wᵀ`` (the same kernel on the same matrix as the dense product), then each token's
        unselected bands filled."""
        try:
            slots = self.pool.acquire(np.arange(self.n_bands))  # [n]
            w = self.pool.weights(slots).transpose(1, 2).reshape(-1, self.d_in)[self.position]  # [V, d] token order
        finally:
            self.pool.release()
        logits = x @ w.T  # [B, V]
        if bool(chosen.all()):
            return logits
        return logits.masked_fill(~chosen[:, self.position // self.band_rows], float("-inf"))

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the matrix for token ids ``ids [...]`` → float32 ``[..., d]``, gathered through the
        same band pool (a tied embedding shares the head's resident bands)."""
        ids = torch.as_tensor(ids, device=self.device)
        if ids.dtype not in (torch.int32, torch.int64) or (ids.numel() and (ids.min() < 0 or ids.max() >= self.d_out)):
            raise DataError(f"token ids must be integers in 0..{self.d_out - 1}")
        flat = self.position[ids.reshape(-1)]  # [T] adapter rows
        band, offset = flat // self.band_rows, flat % self.band_rows  # [T], [T]
        out = torch.empty(flat.shape[0], self.d_in, device=self.device)  # [T, d]
        needed = torch.unique(band).cpu().numpy()
        slot_of = torch.empty(self.n_bands, dtype=torch.int64, device=self.device)
        for start in range(0, len(needed), self.pool.slots):
            group = needed[start:start + self.pool.slots]
            slot_of[torch.as_tensor(group, device=self.device)] = self.pool.acquire(group)
            take = torch.isin(band, torch.as_tensor(group, device=self.device))  # [T] rows of this group
            out[take] = self.pool.rows(slot_of[band[take]], offset[take])
            self.pool.release()
        return out.reshape(*ids.shape, self.d_in)

    # -- statistics ------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Cache counters and timing since :meth:`reset_stats`, plus what a token read on average:
        ``bands_per_token``, ``row_share`` (share of the head's rows computed) and
        ``bytes_per_token`` (band bytes + gate bytes)."""
        tokens = max(1, self._tokens)
        rows = self._rows / tokens  # rows computed per token
        row_bytes = self.total_bytes / self.d_out
        gate_bytes = 4 * self.n_bands * (self.d_in + 1)
        return {"cache": self.pool.stats().to_dict(), "host": self.host.stats(), "seconds": self._seconds,
                "tokens": self._tokens,
                "calls": self._calls, "device": str(self.device), "quant": self.config.quant or "fp32",
                "sparsity": self.sparsity, "mass": self.mass, "bands": self.n_bands,
                "bands_per_token": self._bands / tokens, "row_share": rows / self.d_out,
                "bytes_per_token": rows * row_bytes + gate_bytes, "total_bytes": self.total_bytes}

    def reset_stats(self) -> None:
        """Zero the counters (resident bands stay)."""
        self.pool.reset_stats()
        self.host.reset_stats()
        self._seconds, self._tokens, self._calls, self._bands, self._rows = 0.0, 0, 0, 0, 0

    def clear(self) -> None:
        """Drop every band from the device slots (the next call starts from a cold cache)."""
        self.pool.clear()

    def close(self) -> None:
        """Free the slots and stop the reader threads."""
        self.pool.close()
        self.host.close()

    def __enter__(self) -> SelectRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
