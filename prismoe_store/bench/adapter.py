"""The side-by-side benchmark of an adapter (``prismoe benchmark adapter``, DESIGN.md §7).

One run, one device, the same held-out rows for every method:

- **dense** — the fit's dense matrix ``W = Σ_p α_p W_p`` (every tile at weight 1; for ``joint``
  tiles this is the dense ridge solution; for ``independent`` tiles each band averages its live
  tiles, what the runtime computes with a uniform gate at ρ = 1), run as one ``F.linear``;
- **svd** — the best rank-``r`` approximation of that matrix (truncated SVD, computed exactly
  from the Gram matrix of its narrow side, accumulated band by band in float64), with ``r`` the
  largest rank whose two factors take no more bytes than the gated adapter moves per token at
  each ρ (``4·r·(d_in + d_out) ≤`` active bytes), run as two ``F.linear``;
- **adapter** — the runtime (:func:`prismoe_store.runtime.grouped.open_runtime`) at each ρ, with fp32
  and INT8 tiles, pipes ``parallel`` and ``serial``, with the adapter's stored gates (a uniform
  gate when it has none).

For each: relative error ``‖y − z‖/‖z‖`` and pooled R² ``1 − SSE/Σ(z − z̄)²`` (``z̄``: per-output
mean of the evaluated rows) and, when the targets are logits, the top-1 agreement with ``z`` and
the mean ``KL(softmax z ‖ softmax y)``; latency (batch 1) and throughput (batch ``batch``) as
ratios to the dense ``F.linear`` timed in the same interleaved loop (medians of ``repeats``);
*active bytes* — the weight bytes one token touches (dense: the whole matrix; svd: both factors;
adapter: its ``K`` selected tiles per pipe, INT8 tiles with their scales; gates, ``[workers,
d_in]`` per pipe, are listed apart); the peak bytes the tile cache held and its hit rate while
timed (after a warm-up pass). Serial and parallel pipes compute the same sums in another order:
their quality is measured once (parallel) and their outputs compared (``checks``). A sweep of the
cache budget (one token a call, like decoding) gives the hit rate against the budget.

Tiles are served from host RAM by default (read once from the store), so speed measures the
runtime and not the store's codec; ``tiles_in_ram=False`` reads every miss from the store.

>>> import tempfile
>>> import numpy as np
>>> from prismoe_store.fit.job import fit
>>> from prismoe_store.stores.pairs import PairsStore
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((400, 8)).astype(np.float32)
>>> p = PairsStore.create("memory://doc-bench-p", d_in=8, d_out=16, overwrite=True)
>>> _ = p.append(x, x @ rng.standard_normal((8, 16)).astype(np.float32))
>>> a = fit(p, "memory://doc-bench-a", workers=4, scheduler="synchronous", overwrite=True)
>>> r = benchmark_adapter(a, p, sparsities=(0.5, 1.0), repeats=1, budgets=(0.5, 1.0), hit_tokens=2)
>>> row = [x for x in r["rows"] if x["method"] == "adapter" and x["sparsity"] == 1.0][0]
>>> abs(row["rel_err"] - r["rows"][0]["rel_err"]) < 1e-5
True
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prismoe_store.errors import DataError, IncompleteStoreError
from prismoe_store.gates.heldout import resolve_split
from prismoe_store.gates.routing import k_for
from prismoe_store.grid import GridSpec
from prismoe_store.plots import figure
from prismoe_store.runtime.grouped import open_runtime
from prismoe_store.runtime.quant import int8_ready
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore
from prismoe_store.stores.verified import reading

SPARSITIES = (0.1, 0.3, 0.5, 1.0)  # ρ values the adapter runs at
BUDGETS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # cache budgets, shares of every tile's bytes
QUANTS = ("fp32", "int8")
MODES = ("parallel", "serial")
HOST_TILES_LIMIT = 1 << 30  # tiles are served from host RAM up to this many bytes (fp32 + INT8)
KL_ELEMENTS = 1 << 24  # logits evaluated at a time (rows × d_out) when computing KL
MIN_BLOCK_S = 2e-3  # a timing sample is a block of back-to-back calls lasting about this long
MAX_INNER = 1000  # most calls in one timing block
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`benchmark_adapter` measures and how hard it tries.

    >>> BenchConfig(sparsities=(0.3, 1.0)).hit_rhos()
    (0.3,)
    """

    sparsities: tuple[float, ...] = SPARSITIES  # ρ values the adapter runs at
    device: str = "cpu"  # torch device of every method: "cpu", "cuda", ...
    logits: bool | None = None  # z are logits (top-1 agreement, KL); None: from the pairs' provenance
    max_rows: int = 2048  # held-out rows evaluated (the first ones of the fit's split)
    eval_batch: int = 256  # rows per call while measuring quality
    batch: int = 64  # the throughput batch (rows per call); latency is one row per call
    repeats: int = 5  # interleaved timing repeats; medians are reported
    budgets: tuple[float, ...] = BUDGETS  # hit-rate sweep: cache budgets as shares of every tile's bytes
    hit_sparsities: tuple[float, ...] | None = None  # ρ values of the sweep; None: the sparsities below 1
    hit_tokens: int = 32  # sweep: one-token calls that warm the cache, then as many measured
    svd_points: int = 12  # ranks on the SVD quality curve (for the plot)
    quants: tuple[str, ...] = QUANTS  # tile formats; "int8" is skipped (and said so) when not quantized
    modes: tuple[str, ...] = MODES  # pipe serialization modes
    tiles_in_ram: bool | None = None  # serve tiles from host RAM; None: when they fit HOST_TILES_LIMIT
    threads: int | None = None  # torch CPU threads during the run (restored after); None: leave as is

    def __post_init__(self) -> None:
        for name in ("sparsities", "budgets", "quants", "modes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise DataError(f"{name} must not be empty")
        if self.hit_sparsities is not None:
            object.__setattr__(self, "hit_sparsities", tuple(self.hit_sparsities))
        for rho in self.sparsities + (self.hit_sparsities or ()):
            if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
                raise DataError(f"each sparsity must be in (0, 1], got {rho!r}")
        for share in self.budgets:
            if not (isinstance(share, (int, float)) and 0.0 < share <= 1.0):
                raise DataError(f"each cache budget share must be in (0, 1], got {share!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise DataError(f"threads must be a positive integer, got {self.threads!r}")
        for name in ("max_rows", "eval_batch", "batch", "repeats", "hit_tokens", "svd_points"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if any(q not in QUANTS for q in self.quants):
            raise DataError(f"quants must be among {QUANTS}, got {self.quants}")
        if any(m not in MODES for m in self.modes):
            raise DataError(f"modes must be among {MODES}, got {self.modes}")

    def hit_rhos(self) -> tuple[float, ...]:
        """The ρ values of the hit-rate sweep."""
        if self.hit_sparsities is not None:
            return self.hit_sparsities
        return tuple(r for r in self.sparsities if r < 1.0)


def targets_are_logits(provenance: dict) -> bool:
    """True when a pairs store's provenance says ``z`` are logits (``prismoe collect --target logits``).

    >>> targets_are_logits({"settings": {"target": "logits"}}), targets_are_logits({"source": "synth"})
    (True, False)
    """
    settings = provenance.get("settings") if isinstance(provenance.get("settings"), dict) else {}
    return (settings.get("target") or provenance.get("target")) == "logits"


# -- the methods -------------------------------------------------------------------------------


class _HostTiles:
    """A TileSource serving an adapter's tiles from host RAM (each pipe's arrays read once).

    ``uniform=True`` hides the gates (the runtime then uses a uniform gate)."""

    def __init__(self, adapter: AdapterStore, *, int8: bool, uniform: bool = False):
        self.d_in, self.d_out, self.mode = adapter.d_in, adapter.d_out, adapter.mode
        self.alphas, self.grids = adapter.alphas, adapter.grids
        attrs = adapter.attrs()
        self._attrs = {k: v for k, v in attrs.items() if not (uniform and k == "gates")}
        with reading(f"tiles of {adapter.url}"):
            self._fp32 = [np.asarray(adapter.tiles(p)[...]) for p in range(adapter.n_pipes)]
            self._int8 = ([tuple(np.asarray(a[...]) for a in adapter.int8_arrays(p)) for p in range(adapter.n_pipes)]
                          if int8 else None)
        self._gates = [adapter.read_gate(p) for p in range(adapter.n_pipes)]
        self._uniform = uniform

    def uniform(self) -> "_HostTiles":
        """The same tiles behind a uniform gate."""
        view = _HostTiles.__new__(_HostTiles)
        view.__dict__.update(self.__dict__)
        view._attrs = {k: v for k, v in self._attrs.items() if k != "gates"}
        view._uniform = True
        return view

    def attrs(self) -> dict:
        return self._attrs

    def read_tile(self, pipe: int, worker: int) -> np.ndarray:
        rows, cols = self.grids[pipe].tile_region(worker)
        return np.ascontiguousarray(self._fp32[pipe][rows, cols])

    def read_tile_int8(self, pipe: int, worker: int) -> tuple[np.ndarray, np.ndarray]:
        if self._int8 is None:
            raise IncompleteStoreError("no INT8 tiles were loaded")
        g = self.grids[pipe]
        rows, cols = g.tile_region(worker)
        q, s = self._int8[pipe]
        return np.ascontiguousarray(q[rows, cols]), np.ascontiguousarray(s[rows, g.row_col(worker)[1]])

    def read_gate(self, pipe: int):
        return None if self._uniform else self._gates[pipe]


class _UniformStore:
    """An adapter store behind a uniform gate (tiles read from the store)."""

    def __init__(self, adapter: AdapterStore):
        self._a = adapter
        self.d_in, self.d_out, self.mode = adapter.d_in, adapter.d_out, adapter.mode
        self.alphas, self.grids = adapter.alphas, adapter.grids

    def attrs(self) -> dict:
        return {k: v for k, v in self._a.attrs().items() if k != "gates"}

    def read_tile(self, pipe, worker):
        return self._a.read_tile(pipe, worker)

    def read_tile_int8(self, pipe, worker):
        return self._a.read_tile_int8(pipe, worker)

    def read_gate(self, pipe):
        return None


def dense_matrix(adapter: AdapterStore) -> np.ndarray:
    """The adapter's dense equivalent ``Σ_p α_p s_p W_p`` as float32 ``[d_out, d_in]`` (``s_p = 1``
    for ``joint`` tiles, ``1/C_live`` for ``independent`` ones): what the runtime computes with a
    uniform gate at ρ = 1.

    >>> from prismoe_store.grid import plan_grid
    >>> a = AdapterStore.create("memory://doc-bench-dense", grids=[plan_grid(4, 4, 4)], overwrite=True)
    >>> dense_matrix(a).shape
    (4, 4)
    """
    w = np.zeros((adapter.d_out, adapter.d_in), np.float64)
    for p, (alpha, g) in enumerate(zip(adapter.alphas, adapter.grids)):
        scale = 1.0 if adapter.mode == "joint" else 1.0 / -(-g.d_in // g.tile_in)
        w += alpha * scale * adapter.dense(p).astype(np.float64)
    return w.astype(np.float32)


@dataclass(frozen=True)
class _Svd:
    """The narrow-side eigenbasis of ``W`` (from its Gram matrix): ``W_r = W V_r V_rᵀ`` (or ``U_r U_rᵀ W``)."""

    basis: torch.Tensor  # [k, k] float64 eigenvectors, columns by descending eigenvalue (k = min(M, N))
    values: np.ndarray  # [k] eigenvalues σ² (descending)
    right: bool  # True: basis spans the input side (V), False: the output side (U)

    @classmethod
    def of(cls, w: np.ndarray, band: int = 4096) -> "_Svd":
        n, m = w.shape
        right = m <= n
        k = min(m, n)
        gram = np.zeros((k, k), np.float64)
        if right:  # WᵀW accumulated over row bands of W
            for s in range(0, n, band):
                b = w[s:s + band].astype(np.float64)
                gram += b.T @ b
        else:
            for s in range(0, m, band):
                b = w[:, s:s + band].astype(np.float64)
                gram += b @ b.T
        vals, vecs = np.linalg.eigh(gram)
        order = np.argsort(vals)[::-1]
        return cls(torch.from_numpy(np.ascontiguousarray(vecs[:, order])), np.maximum(vals[order], 0.0), right)

    def factors(self, w: np.ndarray, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [d_out, r], B [r, d_in])`` float32 with ``W_r = A B``."""
        basis = self.basis[:, :rank].float()  # [k, r]
        wt = torch.from_numpy(w)
        if self.right:
            return wt @ basis, basis.T.contiguous()
        return basis.contiguous(), basis.T @ wt


def svd_rank(active_bytes: int, d_in: int, d_out: int, itemsize: int = 4) -> int:
    """The largest rank whose factors ``[d_out, r]`` and ``[r, d_in]`` fit in ``active_bytes``
    (at least 1, at most ``min(d_in, d_out)``).

    >>> svd_rank(4 * 10 * (64 + 256), 64, 256), svd_rank(10**9, 64, 256)
    (10, 64)
    """
    return max(1, min(min(d_in, d_out), active_bytes // (itemsize * (d_in + d_out))))


def active_bytes(grids: Sequence[GridSpec], rho: float, quant: str = "fp32") -> int:
    """Weight bytes one token touches in the gated adapter: ``K_p`` tiles per pipe (INT8: 1 byte
    a value plus a float32 scale per tile row).

    >>> from prismoe_store.grid import plan_pipes
    >>> active_bytes(plan_pipes(64, 256, 512), 1.0) == 3 * 64 * 256 * 4
    True
    """
    total = 0
    for g in grids:
        a, b = g.tile_shape
        entry = a * b + 4 * a if quant == "int8" else 4 * a * b
        total += k_for(rho, g.active_count) * entry
    return total


# -- measuring ---------------------------------------------------------------------------------


class _Heldout:
    """The evaluated held-out rows on the device, with the target's sums for R²."""

    def __init__(self, x: np.ndarray, z: np.ndarray, device: torch.device, logits: bool, batch: int):
        self.x = torch.from_numpy(x).to(device)  # [n, M]
        self.z = torch.from_numpy(z).to(device)  # [n, N]
        zd = self.z.double()
        self.zsq = float(zd.pow(2).sum())
        self.sst = float((zd - zd.mean(0)).pow(2).sum())
        self.logits = logits
        self.batch = max(1, min(batch, KL_ELEMENTS // max(1, z.shape[1]))) if logits else batch

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def score(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Relative error, R² (and top-1 agreement, KL for logits) of ``predict`` on the rows."""
        sse, top1, kl = 0.0, 0, 0.0
        with torch.no_grad():
            for s in range(0, self.rows, self.batch):
                x, z = self.x[s:s + self.batch], self.z[s:s + self.batch]
                y = predict(x).float()
                sse += float((y.double() - z.double()).pow(2).sum())
                if self.logits:
                    top1 += int((y.argmax(1) == z.argmax(1)).sum())
                    lz, ly = F.log_softmax(z.float(), 1), F.log_softmax(y, 1)
                    kl += float((lz.exp() * (lz - ly)).sum(1).clamp_min(0).double().sum())  # ≥ 0 up to rounding
        out = {"rel_err": math.sqrt(sse / self.zsq) if self.zsq > 0 else float("nan"),
               "r2": 1.0 - sse / self.sst if self.sst > 0 else float("nan"), "top1": None, "kl": None}
        if self.logits:
            out["top1"], out["kl"] = top1 / self.rows, kl / self.rows
        return out


def _timed(fn, x: torch.Tensor, sync, inner: int = 1) -> float:
    """Seconds per call of ``fn(x)``, over ``inner`` back-to-back calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn(x)
    sync()
    return (time.perf_counter() - t0) / inner


def _speed(fn, dense, x1: torch.Tensor, xb: torch.Tensor, repeats: int) -> dict:
    """Median latency (batch 1) and throughput (batch ``len(xb)``) of ``fn`` and of ``dense``, timed
    interleaved (dense, fn, dense, fn, ...) so that both see the same machine load. Each sample is a
    block of back-to-back calls lasting about ``MIN_BLOCK_S`` (so a microsecond ``F.linear`` is timed
    in its steady state, not cold after the other method ran)."""
    sync = torch.cuda.synchronize if x1.is_cuda else (lambda: None)
    with torch.no_grad():
        inner = {}
        for name, f, x in (("d1", dense, x1), ("f1", fn, x1), ("db", dense, xb), ("fb", fn, xb)):
            f(x)  # warm
            once = _timed(f, x, sync)
            inner[name] = max(1, min(MAX_INNER, math.ceil(MIN_BLOCK_S / max(once, 1e-9))))
        t = {k: [] for k in inner}
        for _ in range(repeats):
            t["d1"].append(_timed(dense, x1, sync, inner["d1"]))
            t["f1"].append(_timed(fn, x1, sync, inner["f1"]))
            t["db"].append(_timed(dense, xb, sync, inner["db"]))
            t["fb"].append(_timed(fn, xb, sync, inner["fb"]))
    m = {k: statistics.median(v) for k, v in t.items()}
    n = xb.shape[0]
    return {"latency_s": m["f1"], "dense_latency_s": m["d1"], "latency_vs_dense": m["f1"] / m["d1"],
            "throughput_tok_s": n / m["fb"], "dense_throughput_tok_s": n / m["db"],
            "throughput_vs_dense": m["db"] / m["fb"]}


def _read_heldout(adapter: AdapterStore, pairs: PairsStore, max_rows: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The first ``max_rows`` held-out rows of the fit's seeded split."""
    split = resolve_split(adapter)
    xs, zs, have = [], [], 0
    for s, e in split.blocks(pairs):
        x, z = split.read(pairs, s, e, heldout=True)
        xs.append(x[: max_rows - have])
        zs.append(z[: max_rows - have])
        have += len(xs[-1])
        if have >= max_rows:
            break
    if have == 0:
        raise DataError(f"{pairs.url} has no held-out rows under the fit's split (holdout {split.holdout}): "
                        "nothing to measure on")
    return np.concatenate(xs), np.concatenate(zs), asdict(split)


def benchmark_adapter(adapter, pairs, config: BenchConfig | None = None, *, progress: Progress | None = None,
                      **options) -> dict:
    """Measure the dense matrix, the truncated SVD and the adapter side by side; a JSON-ready dict.

    ``adapter`` and ``pairs`` are stores or their paths/URLs; ``config`` (or keyword ``options``,
    the fields of :class:`BenchConfig`) says what to measure. See the module docstring for what
    each number means and :func:`format_markdown` / :func:`write_plots` for the table and plots.
    """
    if config is not None and options:
        raise DataError("pass either a BenchConfig or keyword options, not both")
    cfg = config if config is not None else BenchConfig(**options)
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _benchmark(adapter, pairs, cfg, progress)
    finally:
        torch.set_num_threads(before)


def _benchmark(adapter, pairs, cfg: BenchConfig, progress: Progress | None) -> dict:
    t_start = time.perf_counter()
    adapter, pairs, device = _open(adapter, pairs, cfg.device)
    m, n = adapter.d_in, adapter.d_out
    grids = adapter.grids
    quants = [q for q in cfg.quants if q == "fp32" or int8_ready(adapter)]
    logits = targets_are_logits(pairs.provenance) if cfg.logits is None else bool(cfg.logits)
    x, z, split = _read_heldout(adapter, pairs, cfg.max_rows)
    held = _Heldout(x, z, device, logits, cfg.eval_batch)
    xb = torch.from_numpy(np.resize(x, (cfg.batch, m))).to(device)  # the throughput batch (rows cycled if few)
    gate_bytes = sum(4 * g.workers * (m + 1) for g in grids)
    bench = _Bench(held=held, x1=xb[:1], xb=xb, cfg=cfg, device=device, dense_bytes=4 * m * n, gate_bytes=gate_bytes)
    steps = 2 + len(cfg.sparsities) * (1 + 2 * len(quants) * len(cfg.modes)) + len(cfg.budgets) * len(cfg.hit_rhos())
    bench.ticker(progress, steps)

    # the tiles' source: host RAM (read once) or the store
    tile_bytes = sum(g.d_out_pad * g.d_in_pad for g in grids) * (5 if "int8" in quants else 4)
    in_ram = tile_bytes <= HOST_TILES_LIMIT if cfg.tiles_in_ram is None else cfg.tiles_in_ram
    source = _HostTiles(adapter, int8="int8" in quants) if in_ram else adapter
    uniform = source.uniform() if in_ram else _UniformStore(adapter)
    has_gates = all(adapter.read_gate(p) is not None for p in range(adapter.n_pipes))
    gate_info = adapter.gate_settings()

    w = dense_matrix(adapter)
    rows = [bench.dense_row(w)]
    svd_rows, curve = bench.svd_rows(w, grids)
    adapter_rows, checks = bench.adapter_rows(source, uniform, grids, quants)
    rows += svd_rows + adapter_rows
    _mark_pareto(rows)
    sweep = bench.hit_sweep(source, x, grids)

    fit_metrics = adapter.metrics_record().to_dict() if adapter.metrics_record() else {}
    if fit_metrics.get("combined"):
        checks["fit_combined_rel_err"] = fit_metrics["combined"].get("rel_err")
        checks["fit_holdout_rows"] = fit_metrics.get("holdout_rows")
    return {
        "adapter": adapter.url, "pairs": pairs.url, "device": str(device), "threads": torch.get_num_threads(),
        "shape": {"d_in": m, "d_out": n, "mode": adapter.mode, "alphas": adapter.alphas,
                  "grids": [str(g) for g in grids], "workers": [g.workers for g in grids],
                  "active_workers": [g.active_count for g in grids]},
        "heldout": {"rows": held.rows, "split": split, "logits": logits,
                    "logits_from": "provenance" if cfg.logits is None else "option"},
        "gates": {"trained": has_gates, "sparsity": gate_info.get("sparsity") if has_gates else None},
        "tiles_from": "host RAM" if in_ram else "store",
        "config": {**asdict(cfg), "hit_sparsities": list(cfg.hit_rhos())},
        "quants": quants, "rows": rows, "svd_curve": curve, "hit_rate": sweep, "checks": checks,
        "memory": {"dense_bytes": 4 * m * n, "tiles_bytes_fp32": active_bytes(grids, 1.0, "fp32"),
                   "tiles_bytes_int8": active_bytes(grids, 1.0, "int8"),
                   "gate_bytes": gate_bytes, "peak_rss_bytes": _peak_rss()},
        "seconds": time.perf_counter() - t_start,
    }


def _open(adapter, pairs, device) -> tuple[AdapterStore, PairsStore, torch.device]:
    if not isinstance(adapter, AdapterStore):
        adapter = AdapterStore.open(adapter)
    if not adapter.complete:
        raise IncompleteStoreError(f"adapter {adapter.url} is not finished: re-run `prismoe fit` to complete it")
    if not isinstance(pairs, PairsStore):
        pairs = PairsStore.open(pairs)
    if (pairs.d_in, pairs.d_out) != (adapter.d_in, adapter.d_out):
        raise DataError(f"pairs are {pairs.d_in}→{pairs.d_out} but the adapter maps {adapter.d_in}→{adapter.d_out}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' asked for but CUDA is not available")
    return adapter, pairs, dev


@dataclass
class _Bench:
    """One benchmark run's shared inputs; each method's rows come from one method below."""

    held: _Heldout  # the evaluated held-out rows
    x1: torch.Tensor  # [1, M]: the latency input
    xb: torch.Tensor  # [batch, M]: the throughput input
    cfg: BenchConfig  # what to measure
    device: torch.device  # where everything runs
    dense_bytes: int  # bytes of the dense matrix
    gate_bytes: int  # bytes of every pipe's gate (fp32 [workers, d_in] + bias), read for every token
    dense: Callable | None = None  # dense F.linear (set by dense_row)
    dense_err: float = float("nan")  # its relative error (set by dense_row)
    _tick: Callable[[], None] = lambda: None

    def ticker(self, progress: Progress | None, steps: int) -> None:
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress:
                progress(min(done[0], steps), steps)

        self._tick = tick
        if progress:
            progress(0, steps)

    def speed(self, fn) -> dict:
        return _speed(fn, self.dense, self.x1, self.xb, self.cfg.repeats)

    def dense_row(self, w: np.ndarray) -> dict:
        """The dense matrix as one ``F.linear``."""
        wd = torch.from_numpy(w).to(self.device)
        self.dense = lambda t: F.linear(t, wd)
        sp = self.speed(self.dense)
        sp.update(latency_vs_dense=1.0, throughput_vs_dense=1.0)  # by definition (dense against itself is noise)
        row = {"method": "dense", "label": "dense F.linear", "sparsity": None, "quant": "fp32", "mode": None,
               "rank": None, **self.held.score(self.dense), **sp, "active_bytes": self.dense_bytes,
               "active_vs_dense": 1.0, "peak_cache_bytes": None, "hit_rate": None}
        self.dense_err = row["rel_err"]
        self._tick()
        return row

    def svd_rows(self, w: np.ndarray, grids) -> tuple[list[dict], list[dict]]:
        """Truncated SVDs with the adapter's fp32 active bytes at each ρ, and a quality curve over ranks."""
        n, m = w.shape
        svd = _Svd.of(w)
        k_max = min(m, n)
        curve = []
        for r in sorted({int(v) for v in np.geomspace(1, k_max, self.cfg.svd_points).round()} | {k_max}):
            a_, b_ = (t.to(self.device) for t in svd.factors(w, r))
            s = self.held.score(lambda t: F.linear(F.linear(t, b_), a_))
            curve.append({"rank": r, "active_bytes": 4 * r * (m + n), "rel_err": s["rel_err"], "r2": s["r2"]})
        self._tick()
        rows = []
        for rho in self.cfg.sparsities:
            budget = active_bytes(grids, rho, "fp32")
            r = svd_rank(budget, m, n)
            a_, b_ = (t.to(self.device) for t in svd.factors(w, r))
            fn = lambda t, a_=a_, b_=b_: F.linear(F.linear(t, b_), a_)  # noqa: E731
            rows.append({"method": "svd", "label": f"svd r={r} (bytes of ρ={rho:g})", "sparsity": rho,
                         "quant": "fp32", "mode": None, "rank": r, **self.held.score(fn), **self.speed(fn),
                         "active_bytes": 4 * r * (m + n), "active_vs_dense": 4 * r * (m + n) / self.dense_bytes,
                         "adapter_bytes": budget, "peak_cache_bytes": None, "hit_rate": None})
            self._tick()
        return rows, curve

    def adapter_rows(self, source, uniform, grids, quants) -> tuple[list[dict], dict]:
        """The runtime at each ρ × tile format × pipe mode, and the exactness checks."""
        cfg, held, dev = self.cfg, self.held, str(self.device)
        checks: dict = {"serial_vs_parallel_max_rel_diff": 0.0}
        with open_runtime(uniform, device=dev, sparsity=1.0) as rt:
            yu = held.score(rt)
        checks["uniform_rho1_rel_err"] = yu["rel_err"]
        checks["uniform_rho1_vs_dense_rel_err_diff"] = abs(yu["rel_err"] - self.dense_err)
        x_sub = held.x[: cfg.eval_batch]  # rows on which INT8 outputs are compared with fp32 ones
        y_fp32: dict[float, torch.Tensor] = {}
        rows = []
        for quant in quants:
            for rho in cfg.sparsities:
                base: dict | None = None
                y_first = None
                for mode in cfg.modes:
                    with open_runtime(source, device=dev, sparsity=rho, quant=None if quant == "fp32" else quant,
                                      mode=mode) as rt:
                        if base is None:
                            base = held.score(rt)  # quality, once per ρ and format (serial sums the same terms)
                        self._tick()
                        rt.clear()  # one batch from a cold cache: the bytes a call of `batch` tokens needs
                        rt.reset_stats()
                        with torch.no_grad():
                            y = rt(self.xb)
                        cold = rt.stats()["cache"]
                        if y_first is None:
                            y_first = y
                            with torch.no_grad():
                                y_sub = rt(x_sub)
                            if quant == "fp32":
                                y_fp32[rho] = y_sub
                            elif rho in y_fp32:
                                ref = y_fp32[rho]
                                base = {**base, "output_vs_fp32": float(torch.linalg.norm(y_sub - ref)
                                                                        / torch.linalg.norm(ref).clamp_min(1e-30))}
                        else:
                            diff = float((y - y_first).abs().max() / y_first.abs().max().clamp_min(1e-30))
                            checks["serial_vs_parallel_max_rel_diff"] = max(
                                checks["serial_vs_parallel_max_rel_diff"], diff)
                        rt.reset_stats()
                        sp = self.speed(rt)  # warms, then times the steady state
                        c = rt.stats()["cache"]
                    act = active_bytes(grids, rho, quant)
                    rows.append({"method": "adapter", "label": f"adapter ρ={rho:g} {quant} {mode}", "sparsity": rho,
                                 "quant": quant, "mode": mode, "rank": None, **base, **sp, "active_bytes": act,
                                 "active_vs_dense": act / self.dense_bytes,
                                 "with_gates_vs_dense": (act + self.gate_bytes) / self.dense_bytes,
                                 "peak_cache_bytes": cold["peak_bytes"],
                                 "batch_bytes_loaded": cold["bytes_loaded"], "hit_rate": c["hit_rate"],
                                 "peak_cache_bytes_timed": c["peak_bytes"], "cache_budget_bytes": c["budget_bytes"]})
                    self._tick()
        return rows, checks

    def hit_sweep(self, source, x: np.ndarray, grids) -> list[dict]:
        """Hit rate against the cache budget, one held-out token a call (the first half warms the cache)."""
        cfg, dev = self.cfg, str(self.device)
        with open_runtime(source, device=dev, sparsity=1.0) as rt:
            total = rt.total_bytes
            biggest = max(rt.entry_bytes(p) for p in range(len(grids)))
        tokens = np.resize(x, (2 * cfg.hit_tokens, x.shape[1]))
        sweep = []
        for rho in cfg.hit_rhos():
            for share in cfg.budgets:
                budget = max(biggest, int(share * total))
                with open_runtime(source, device=dev, sparsity=rho, cache_bytes=budget) as rt:
                    for t in range(cfg.hit_tokens):
                        rt(tokens[t:t + 1])
                    rt.reset_stats()
                    for t in range(cfg.hit_tokens, 2 * cfg.hit_tokens):
                        rt(tokens[t:t + 1])
                    c = rt.stats()["cache"]
                sweep.append({"sparsity": rho, "share": share, "budget_bytes": budget, "hit_rate": c["hit_rate"],
                              "bytes_loaded_per_token": c["bytes_loaded"] / cfg.hit_tokens,
                              "peak_bytes": c["peak_bytes"]})
                self._tick()
        return sweep


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _mark_pareto(rows: list[dict]) -> None:
    """Flag rows on the quality/bytes Pareto frontier (no other row is at most as big and more accurate)."""
    pts = [(r["active_bytes"], r["rel_err"]) for r in rows]
    for r, (b, e) in zip(rows, pts):
        r["pareto"] = not any((b2 <= b and e2 < e) or (b2 < b and e2 <= e) for b2, e2 in pts)


# -- reporting ---------------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def _ratio(v) -> str:
    """A speed ratio with three significant digits (``1234``, ``12.3``, ``0.00123``)."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.0f}" if v >= 1000 else f"{v:.3g}"


def format_markdown(report: dict) -> str:
    """The benchmark as Markdown: a header, the side-by-side table, the hit-rate sweep and the checks.

    >>> r = {"adapter": "a", "pairs": "p", "device": "cpu", "threads": 2, "heldout": {"rows": 3, "logits": False},
    ...      "shape": {"d_in": 2, "d_out": 2, "mode": "joint", "grids": ["g"]}, "gates": {"trained": False},
    ...      "tiles_from": "host RAM", "rows": [], "hit_rate": [], "checks": {}, "config": {"batch": 64}}
    >>> format_markdown(r).splitlines()[0]
    '## Benchmark: a on p'
    """
    s, h = report["shape"], report["heldout"]
    gates = report["gates"]
    gate = f"trained gates (ρ = {gates['sparsity']})" if gates.get("trained") else "uniform gate (no trained gates)"
    batch = report["config"]["batch"]
    lines = [f"## Benchmark: {report['adapter']} on {report['pairs']}", "",
             f"{s['d_in']} → {s['d_out']}, {s['mode']} tiles, {gate}; {h['rows']} held-out rows; "
             f"device {report['device']} ({report['threads']} CPU thread{'s' if report['threads'] != 1 else ''}); tiles served from {report['tiles_from']}.",
             ""]
    lines += [f"- pipe {p + 1}: {g}" for p, g in enumerate(s["grids"])]
    lines.append("")
    logit_cols = h.get("logits")
    head = ["method", "rel. error", "R²"] + (["top-1", "KL"] if logit_cols else []) + ["‖Δy‖ INT8/fp32",
        "latency ×dense (b=1)", f"throughput ×dense (b={batch})", "active bytes/token", "×dense bytes",
        "×dense with gates", f"peak cache (b={batch}, cold)", "hit rate (timed)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in report["rows"]:
        cells = [r["label"] + (" ★" if r.get("pareto") else ""), _num(r["rel_err"], ".4f"), _num(r["r2"], ".4f")]
        if logit_cols:
            cells += [_num(r.get("top1"), ".3f"), _num(r.get("kl"), ".4f")]
        cells.append(_num(r.get("output_vs_fp32"), ".1e"))
        cells += [_ratio(r["latency_vs_dense"]), _ratio(r["throughput_vs_dense"]), _bytes(r["active_bytes"]),
                  _num(r["active_vs_dense"], ".3f"), _num(r.get("with_gates_vs_dense"), ".3f"),
                  _bytes(r.get("peak_cache_bytes")), _num(r.get("hit_rate"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    if report["rows"]:
        d = report["rows"][0]
        lines += ["", f"★: on the Pareto frontier of relative error against active bytes. Dense F.linear: "
                      f"{d['dense_latency_s'] * 1e6:.1f} µs at batch 1, {d['dense_throughput_tok_s']:.0f} tokens/s "
                      f"at batch {batch}. Peak cache: the most bytes the tile cache held during one call of {batch} "
                      "held-out tokens from a cold cache; hit rate: while timed (warm, steady state). "
                      "Serial rows share the parallel rows' quality (same sums, another order). "
                      "‖Δy‖ INT8/fp32: relative difference of the INT8 adapter's outputs from the fp32 "
                      "adapter's at the same ρ."]
        gate = (report.get("memory") or {}).get("gate_bytes")
        if gate:
            lines[-1] += (f" Active bytes count the selected tiles; every token also reads every pipe's gate "
                          f"({_bytes(gate)} fp32, {gate / d['active_bytes']:.3f}× the dense matrix): "
                          "“×dense with gates” adds them.")
    if report["hit_rate"]:
        rhos = sorted({c["sparsity"] for c in report["hit_rate"]})
        shares = sorted({c["share"] for c in report["hit_rate"]})
        cell = {(c["sparsity"], c["share"]): c for c in report["hit_rate"]}
        lines += ["", "Cache hit rate against the budget (one token a call, after as many warm-up tokens):", "",
                  "| budget (share of all tiles) | " + " | ".join(f"ρ = {r:g}" for r in rhos) + " |",
                  "|---" + "|---:" * len(rhos) + "|"]
        for sh in shares:
            lines.append(f"| {sh:.2%} ({_bytes(cell[(rhos[0], sh)]['budget_bytes'])}) | "
                         + " | ".join(_num(cell[(r, sh)]["hit_rate"], ".3f") if (r, sh) in cell else "—" for r in rhos)
                         + " |")
    c = report.get("checks") or {}
    if c:
        parts = []
        if "uniform_rho1_rel_err" in c:
            parts.append(f"runtime with a uniform gate at ρ = 1: relative error {c['uniform_rho1_rel_err']:.6f} "
                         f"(dense {report['rows'][0]['rel_err']:.6f})")
        if c.get("fit_combined_rel_err") is not None:
            parts.append(f"the fit's own held-out relative error {c['fit_combined_rel_err']:.6f} "
                         f"(on all its {c.get('fit_holdout_rows')} held-out rows)")
        if "serial_vs_parallel_max_rel_diff" in c:
            parts.append(f"serial vs parallel outputs differ by at most {c['serial_vs_parallel_max_rel_diff']:.1e} "
                         "(relative to max |y|)")
        lines += ["", "Checks: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def write_plots(report: dict, out_dir) -> list[str]:
    """Draw the report as PNGs in ``out_dir``: ``quality_vs_bytes.png`` (the Pareto frontier),
    ``hit_rate.png`` (hit rate against the cache budget) and ``latency.png`` (speed ratios against ρ).
    Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    dense = rows[0]
    paths = []

    # quality against active bytes
    fig = figure(7.0, 4.6, dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    curve = report["svd_curve"]
    ax.plot([c["active_bytes"] for c in curve], [c["rel_err"] for c in curve], "-", color="C0", lw=1.2, alpha=0.6,
            label="truncated SVD (rank 1 … full)")
    svd = [r for r in rows if r["method"] == "svd"]
    ax.plot([r["active_bytes"] for r in svd], [r["rel_err"] for r in svd], "s", color="C0", ms=6,
            label="SVD at the adapter's fp32 bytes")
    for i, quant in enumerate(report["quants"]):
        pts = sorted((r["active_bytes"], r["rel_err"], r["sparsity"]) for r in rows
                     if r["method"] == "adapter" and r["quant"] == quant and r["mode"] == "parallel")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i + 1}", label=f"adapter {quant}")
        for b, e, rho in pts:
            ax.annotate(f"ρ={rho:g}", (b, e), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i + 1}")
        gate = (report.get("memory") or {}).get("gate_bytes")
        if gate:  # the gates are read for every token: the bytes a token really costs
            ax.plot([p[0] + gate for p in pts], [p[1] for p in pts], "o--", color=f"C{i + 1}", mfc="none", lw=0.8,
                    label=f"adapter {quant} + gates ({gate / 1024:.0f} KiB a token)")
    ax.plot([dense["active_bytes"]], [dense["rel_err"]], "*", color="k", ms=12, label="dense ridge (F.linear)")
    front = sorted((r["active_bytes"], r["rel_err"]) for r in rows if r.get("pareto"))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.3", ls="--", lw=1,
                label="Pareto frontier")
    ax.set_xscale("log")
    errs = [r["rel_err"] for r in rows if math.isfinite(r["rel_err"])] + [c["rel_err"] for c in curve]
    if errs and min(errs) > 0 and max(errs) > 20 * min(errs):
        ax.set_yscale("log")
    ax.set_xlabel("active weight bytes per token")
    ax.set_ylabel("held-out relative error ‖y − z‖/‖z‖")
    ax.set_title(f"quality against bytes: {report['shape']['d_in']}→{report['shape']['d_out']}, "
                 f"{report['heldout']['rows']} held-out rows", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    paths.append(out / "quality_vs_bytes.png")
    fig.savefig(paths[-1], format="png")

    # hit rate against the cache budget
    fig = figure(6.0, 4.0, dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for i, rho in enumerate(sorted({c["sparsity"] for c in report["hit_rate"]})):
        pts = sorted((c["share"], c["hit_rate"]) for c in report["hit_rate"] if c["sparsity"] == rho)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"ρ = {rho:g}")
        ax.axvline(100 * rho, color=f"C{i}", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("cache budget (% of all tiles' bytes; dotted: ρ)")
    ax.set_ylabel("hit rate")
    ax.set_title("tile cache hit rate, one held-out token a call", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(out / "hit_rate.png")
    fig.savefig(paths[-1], format="png")

    # speed ratios against ρ
    fig = figure(9.0, 3.8, dpi=110)
    for k, (key, title) in enumerate((("latency_vs_dense", "latency, batch 1 (× dense; lower is better)"),
                                      ("throughput_vs_dense", f"throughput, batch {report['config']['batch']} "
                                                              "(× dense; higher is better)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        i = 0
        for quant in report["quants"]:
            for mode in ("parallel", "serial"):
                pts = sorted((r["sparsity"], r[key]) for r in rows
                             if r["method"] == "adapter" and r["quant"] == quant and r["mode"] == mode)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if mode == "parallel" else "s--",
                            color=f"C{i + 1}", label=f"adapter {quant} {mode}")
                    i += 1
        svd = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == "svd")
        ax.plot([p[0] for p in svd], [p[1] for p in svd], "^:", color="C0", label="SVD, same bytes")
        ax.axhline(1.0, color="k", lw=1, label="dense F.linear")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity ρ")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"speed as ratios to dense F.linear on {report['device']} (medians of "
                 f"{report['config']['repeats']} interleaved repeats)", fontsize=10)
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], format="png")
    return [str(p) for p in paths]
