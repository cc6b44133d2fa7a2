"""The low-VRAM runtime: route each token, load only the selected tiles, combine the pipes.

For a batch of tokens ``x [B, d_in]`` and each pipe ``p`` of the adapter:

1. route every token through the pipe's gate (:func:`prismoe_store.routing.route`; a uniform zero
   gate when the adapter has none): ``K`` selected workers and their weights per token;
2. take the union of the selected tiles and, tile by tile, fetch it through the LRU
   :class:`~prismoe_store.cache.TileCache` (resident tiles first, the next tile read ahead),
   multiply the input slice of the tokens that chose it, weight, and scatter-add into the
   output band;
3. ``y = Σ_p α_p y_p``, truncated to ``d_out``. Pipes run forward on even calls and backward on
   odd ones, so the last pipe's tiles are reused first; the sum is always taken in pipe order.
   Within a band, tiles are added resident-first, so two calls on the same input may differ in
   the last bits (never beyond float32 rounding) when the cache held different tiles.

Only one tile has to be resident at a time, so any budget that holds one tile works (smaller
budgets stream tiles through the cache). ``mode="serial"`` evicts every other pipe's tiles before
a pipe runs, so the cache never holds more than one pipe's tiles; ``"parallel"`` lets all pipes
share it. Gates stay on the device outside the tile budget (``[workers, d_in]`` floats a pipe).

>>> import numpy as np, torch
>>> from prismoe_store.adapter import AdapterStore
>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(6, 10, 8)
>>> a = AdapterStore.create("memory://doc-runtime", grids=[g], overwrite=True, attrs={"complete": True})
>>> w = np.zeros(g.padded_shape, np.float32); w[:10, :6] = np.arange(60).reshape(10, 6)
>>> for r in range(g.rows): a.write_band(0, r, w[r * g.tile_out:(r + 1) * g.tile_out])
>>> rt = open_runtime(a)
>>> x = torch.ones(2, 3, 6)
>>> y = rt(x); y.shape, bool(torch.allclose(y, x @ torch.from_numpy(w[:10, :6]).T))
(torch.Size([2, 3, 10]), True)
>>> rt.stats()["cache"]["misses"] == g.active_count
True
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import AdapterStore, TileSource
from .cache import TileCache
from .errors import CacheError, DataError, IncompleteStoreError
from .grid import GridSpec
from .quant import dequantize_tile, int8_ready
from .routing import route

QUANTS = (None, "int8")
MODES = ("parallel", "serial")
DEFAULT_SPARSITY = 0.3  # ρ for adapters whose gates do not record one


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime runs an adapter.

    >>> RuntimeConfig(mode="serial", quant="int8").mode
    'serial'
    """

    device: str = "cpu"  # where tiles live and are multiplied: "cpu", "cuda", "cuda:1", ...
    cache_bytes: int | None = None  # tile cache budget in bytes; None: room for every non-padding tile
    quant: str | None = None  # None: float32 tiles; "int8": INT8 tiles + per-row scales
    mode: str = "parallel"  # "parallel": pipes share the cache; "serial": one pipe's tiles at a time
    sparsity: float | None = None  # ρ; None: the ρ `fit-gates` recorded, else 1.0 without gates, else 0.3
    prefetch: bool | None = None  # read the next tile on a background thread; None: on CUDA only (on CPU
    # the read costs far more than the compute it would hide, and measured no faster)
    mass: float | None = None  # head adapters: take the fewest bands whose predicted mass reaches this
    # (at most ρ of them); None: a fixed ρ of the bands per token

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise DataError(f"quant must be None or 'int8', got {self.quant!r}")
        if self.mode not in MODES:
            raise DataError(f"mode must be 'parallel' or 'serial', got {self.mode!r}")
        if self.sparsity is not None and not 0.0 < float(self.sparsity) <= 1.0:
            raise DataError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.mass is not None and not 0.0 < float(self.mass) <= 1.0:
            raise DataError(f"mass must be in (0, 1], got {self.mass}")
        bad_budget = not isinstance(self.cache_bytes, (int, np.integer)) or self.cache_bytes < 1
        if self.cache_bytes is not None and bad_budget:
            raise DataError(f"cache_bytes must be a positive integer, got {self.cache_bytes!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise DataError(f"bad device {self.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DataError("device 'cuda' asked for but CUDA is not available: use --device cpu")


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
        self.fit_mode: str = source.mode  # "joint" or "independent": how tile weights combine
        raw_gates = [source.read_gate(p) for p in range(len(self.grids))]
        self.gates = [self._gate(p, g) for p, g in enumerate(raw_gates)]  # per pipe: (weight [W, M], bias [W])
        self.sparsity, self.temperature = self._routing_settings(config.sparsity, any(g is not None for g in raw_gates))
        self.total_bytes = sum(g.active_count * self.entry_bytes(p) for p, g in enumerate(self.grids))
        prefetch = self.device.type == "cuda" if config.prefetch is None else config.prefetch
        self.cache = TileCache(config.cache_bytes or self.total_bytes, device=self.device, prefetch=prefetch)
        self._check_budget()
        self._seconds, self._tokens, self._calls = 0.0, 0, 0
        self._turn = 0  # calls so far (never reset): even turns run the pipes forward, odd backward

    # -- setup -----------------------------------------------------------------------------------
    def entry_bytes(self, pipe: int) -> int:
        """Cache bytes of one of the pipe's tiles: float32 tile, or INT8 tile plus float32 scales."""
        a, b = self.grids[pipe].tile_shape
        return a * b + 4 * a if self.config.quant == "int8" else 4 * a * b

    def _check_budget(self) -> None:
        biggest = max(self.entry_bytes(p) for p in range(len(self.grids)))
        if biggest > self.cache.budget_bytes:
            raise CacheError(f"the cache budget of {self.cache.budget_bytes} bytes is smaller than one tile "
                             f"({biggest} bytes): raise --cache-mb to at least {biggest / 2**20:.3f}")

    def _gate(self, pipe: int, gate) -> tuple[torch.Tensor, torch.Tensor]:
        workers = self.grids[pipe].workers
        if gate is None:  # uniform gate: every active worker scores 0 (all weights 1 at ρ = 1)
            return (torch.zeros(workers, self.d_in, device=self.device),
                    torch.zeros(workers, device=self.device))
        weight, bias = gate
        return (torch.as_tensor(np.asarray(weight, np.float32), device=self.device),
                torch.as_tensor(np.asarray(bias, np.float32), device=self.device))

    def _routing_settings(self, sparsity: float | None, has_gates: bool) -> tuple[float, float]:
        attrs = self.source.attrs() if callable(getattr(self.source, "attrs", None)) else {}
        trained = (attrs.get("gates") or {}).get("settings") or {}  # what `prismoe fit-gates` recorded
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
        ys = [None] * len(self.grids)  # per pipe: [B, N]
        for p in self._pipe_order():
            if self.config.mode == "serial":  # the other pipes' tiles leave before this pipe's arrive
                self.cache.evict(lambda key, p=p: key[0] != p)
            ys[p] = self._pipe(p, x)[:, : self.d_out]  # [B, N]
        y = sum(alpha * yp for alpha, yp in zip(self.alphas, ys))  # [B, N], summed in pipe order
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._seconds += time.perf_counter() - t0
        self._tokens += x.shape[0]
        self._calls += 1
        return y.reshape(*lead, self.d_out)

    def _pipe_order(self) -> list[int]:
        """Pipes forward on even calls, backward on odd ones ("zigzag"): the pipe that ran last is
        still in the cache when the next call starts, so a budget smaller than every pipe's tiles
        does not evict each pipe just before it is needed again (LRU's cyclic-access trap)."""
        order = list(range(len(self.grids)))
        self._turn += 1
        return order if self._turn % 2 == 1 else order[::-1]

    def _pipe(self, p: int, x: torch.Tensor) -> torch.Tensor:
        """One pipe's output ``[B, N_pad]`` for tokens ``x [B, M]``."""
        grid = self.grids[p]
        a, b = grid.tile_shape
        r = route(x, *self.gates[p], grid=grid, sparsity=self.sparsity, mode=self.fit_mode,
                  temperature=self.temperature)
        B, K = r.indices.shape  # r.indices, r.weights: [B, K]
        xp = F.pad(x, (0, grid.d_in_pad - self.d_in))  # [B, M_pad], zeros on the input padding
        yb = torch.zeros(grid.rows, B, a, device=self.device)  # [R, B, a] output bands

        # group the B*K (token, worker) selections by worker
        worker = r.indices.reshape(-1)  # [B*K]
        order = torch.argsort(worker, stable=True)  # [B*K]
        token = torch.arange(B, device=self.device).repeat_interleave(K)[order]  # [B*K], grouped by worker
        weight = r.weights.reshape(-1)[order]  # [B*K]
        counts = torch.bincount(worker, minlength=grid.workers).tolist()  # [W] tokens per worker (host)
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()  # [W+1]

        # the union of selected tiles, resident ones first (they are used before new loads evict them)
        selected = [j for j in range(grid.workers) if counts[j]]
        selected.sort(key=lambda j: (p, j) not in self.cache)
        for i, j in enumerate(selected):
            if i + 1 < len(selected):  # read the next tile from the store while this one computes
                nxt = selected[i + 1]
                self.cache.prefetch((p, nxt), self._loader(p, nxt))
            rows = token[starts[j]:starts[j + 1]]  # [n_j] tokens that chose worker j
            w = weight[starts[j]:starts[j + 1]]  # [n_j] their weights
            band, col = divmod(j, grid.cols)
            xs = xp[rows, col * b:(col + 1) * b]  # [n_j, b] the tile's input slice
            with self.cache.use((p, j), self._loader(p, j)) as tensors:
                tile = self._tile(tensors)  # [a, b] float32 on the device
                out = xs @ tile.T  # [n_j, a]
            yb[band].index_add_(0, rows, out * w[:, None])  # [B, a] band += weighted tile output
        return yb.permute(1, 0, 2).reshape(B, grid.d_out_pad)  # [B, N_pad]

    def _loader(self, p: int, j: int):
        if self.config.quant == "int8":
            return lambda: self.source.read_tile_int8(p, j)  # (int8 [a, b], float32 [a])
        return lambda: (self.source.read_tile(p, j),)  # (float32 [a, b],)

    def _tile(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.config.quant == "int8":
            q, scales = tensors  # int8 [a, b], float32 [a]
            return dequantize_tile(q, scales)  # [a, b], dequantized on the device at use
        return tensors[0]

    # -- statistics and lifetime -----------------------------------------------------------------
    def stats(self) -> dict:
        """Cache counters and timing since the last :meth:`reset_stats`.

        Keys: ``cache`` (hits, misses, evictions, bytes_loaded, peak_bytes, budget_bytes,
        used_bytes, tiles, hit_rate), ``seconds`` (time inside calls), ``tokens``, ``calls``,
        ``device``, ``mode``, ``quant``, ``sparsity``, ``total_bytes`` (every non-padding tile).
        """
        return {"cache": self.cache.stats().to_dict(), "seconds": self._seconds, "tokens": self._tokens,
                "calls": self._calls, "device": str(self.device), "mode": self.config.mode,
                "quant": self.config.quant or "fp32", "sparsity": self.sparsity, "total_bytes": self.total_bytes}

    def reset_stats(self) -> None:
        """Zero the counters and the timer (resident tiles stay: the cache stays warm)."""
        self.cache.reset_stats()
        self._seconds, self._tokens, self._calls = 0.0, 0, 0

    def close(self) -> None:
        """Free the cache and stop its prefetch thread."""
        self.cache.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def input_rows(x, d_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Size]:
    """``(rows [B, d_in] float32 on device, lead shape)`` of an input ``x [..., d_in]`` (torch or
    numpy, a read-only memmap too); raises :class:`DataError` for a wrong width or NaN/Inf.

    >>> rows, lead = input_rows(np.ones((2, 3, 4), np.float32), 4, torch.device("cpu"))
    >>> tuple(rows.shape), tuple(lead)
    ((6, 4), (2, 3))
    """
    if isinstance(x, np.ndarray):  # numpy: a float32 tensor over a copy when the array is read-only
        x = torch.from_numpy(np.array(x, np.float32, copy=not x.flags.writeable or None))
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise DataError(f"input must be [..., {d_in}], got {tuple(x.shape)}")
    rows = x.reshape(-1, d_in).to(device, torch.float32)  # [B, d_in]
    if not bool(torch.isfinite(rows).all()):
        raise DataError("input holds NaN or Inf")
    return rows, x.shape[:-1]


def open_runtime(adapter, *, device: str = "cpu", cache_bytes: int | None = None, quant: str | None = None,
                 mode: str = "parallel", sparsity: float | None = None, prefetch: bool | None = None,
                 mass: float | None = None):
    """Open a runtime over ``adapter`` (a path/URL of an adapter store, or any TileSource).

    A head adapter (``partition`` layout, built by ``prismoe head``) gets a
    :class:`~prismoe_store.runtime_select.SelectRuntime` (``mass`` applies to it); a fitted
    adapter a :class:`Runtime`.

    >>> from prismoe_store.grid import plan_grid
    >>> from prismoe_store.adapter import AdapterStore
    >>> a = AdapterStore.create("memory://doc-open-rt", grids=[plan_grid(4, 4, 4)], overwrite=True,
    ...                         attrs={"complete": True})
    >>> open_runtime(a, mode="serial")(torch.ones(4)).shape
    torch.Size([4])
    """
    if isinstance(adapter, (str, os.PathLike)):
        adapter = AdapterStore.open(adapter, require_complete=True)
    config = RuntimeConfig(device=device, cache_bytes=cache_bytes, quant=quant, mode=mode, sparsity=sparsity,
                           prefetch=prefetch, mass=mass)
    if getattr(adapter, "layout", "ensemble") == "partition":
        from .runtime_select import SelectRuntime

        return SelectRuntime(adapter, config)
    if mass is not None:
        raise DataError("a mass threshold applies to head adapters (`prismoe head`), not to fitted adapters")
    return Runtime(adapter, config)
