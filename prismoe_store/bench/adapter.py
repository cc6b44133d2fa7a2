"""The side-by-side benchmark of an adapter (``prismoe benchmark adapter``, DESIGN.md §7).

One run, one device, the same held-out rows for every method:

- **dense** — the fit's dense matrix ``W = Σ_p α_p W_p`` (every tile at weight 1; for ``joint``
  tiles this is the dense ridge solution; for ``independent`` tiles each band averages its live
  tiles, what the runtime computes with a uniform gate at ρ = 1), run as one ``F.linear``;
- **svd** — the best rank-``r`` approximation of that matrix (truncated SVD, computed exactly
  from the Gram matrix of its narrow side, accumulated band by band in float64), with ``r`` the
  largest rank whose two factors take no more bytes than the gated adapter moves per token at
  each ρ (``4·r·(d_in + d_out) ≤`` active bytes), run as two ``F.linear``;
- **adapter** — the runtime (:func:`prismoe_store.runtime.open.open_runtime`) at each ρ, with fp32
  and INT8 tiles, pipe schedules ``parallel`` and ``serial``, with the adapter's stored gates (a uniform
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
>>> from prismoe_store.fit import FitConfig, fit
>>> from prismoe_store.stores.pairs import PairsStore
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((400, 8)).astype(np.float32)
>>> p = PairsStore.create("memory://doc-bench-p", d_in=8, d_out=16, overwrite=True)
>>> _ = p.append(x, x @ rng.standard_normal((8, 16)).astype(np.float32))
>>> a = fit(p, "memory://doc-bench-a", FitConfig(workers=4), scheduler="synchronous", overwrite=True)
>>> r = benchmark_adapter(a, p, sparsities=(0.5, 1.0), repeats=1, budgets=(0.5, 1.0), hit_tokens=2)
>>> row = [x for x in r["rows"] if x["method"] == "adapter" and x["sparsity"] == 1.0][0]
>>> abs(row["rel_err"] - r["rows"][0]["rel_err"]) < 1e-5
True
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prismoe_store.bench.heldout import Heldout, read_heldout, targets_are_logits
from prismoe_store.bench.svd import GramSvd, svd_rank
from prismoe_store.bench.timing import speed_against_dense
from prismoe_store.errors import DataError, IncompleteStoreError
from prismoe_store.gates.routing import k_for
from prismoe_store.gates.tiles import torch_device
from prismoe_store.grid import GridSpec
from prismoe_store.runtime.dense import dense_matrix
from prismoe_store.runtime.grouped import Runtime
from prismoe_store.runtime.open import open_runtime
from prismoe_store.runtime.quant import int8_ready
from prismoe_store.runtime.tile_source import HostTiles, UniformGate
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore

SPARSITIES = (0.1, 0.3, 0.5, 1.0)  # ρ values the adapter runs at
BUDGETS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # cache budgets, shares of every tile's bytes
QUANTS = ("fp32", "int8")
SCHEDULES = ("parallel", "serial")
HOST_TILES_LIMIT = 1 << 30  # tiles are served from host RAM up to this many bytes (fp32 + INT8)
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
    schedules: tuple[str, ...] = SCHEDULES  # how the pipes share the cache: "parallel", "serial"
    tiles_in_ram: bool | None = None  # serve tiles from host RAM; None: when they fit HOST_TILES_LIMIT
    threads: int | None = None  # torch CPU threads during the run (restored after); None: leave as is

    def __post_init__(self) -> None:
        for name in ("sparsities", "budgets", "quants", "schedules"):
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
        if any(s not in SCHEDULES for s in self.schedules):
            raise DataError(f"schedules must be among {SCHEDULES}, got {self.schedules}")

    def hit_rhos(self) -> tuple[float, ...]:
        """The ρ values of the hit-rate sweep."""
        if self.hit_sparsities is not None:
            return self.hit_sparsities
        return tuple(r for r in self.sparsities if r < 1.0)


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
    x, z, split = read_heldout(adapter, pairs, cfg.max_rows)
    held = Heldout(x, z, device, logits, cfg.eval_batch)
    xb = torch.from_numpy(np.resize(x, (cfg.batch, m))).to(device)  # the throughput batch (rows cycled if few)
    gate_bytes = sum(4 * g.workers * (m + 1) for g in grids)
    bench = _Bench(held=held, x1=xb[:1], xb=xb, cfg=cfg, device=device, dense_bytes=4 * m * n, gate_bytes=gate_bytes)
    steps = (2 + len(cfg.sparsities) * (1 + 2 * len(quants) * len(cfg.schedules))
             + len(cfg.budgets) * len(cfg.hit_rhos()))
    bench.ticker(progress, steps)

    # the tiles' source: host RAM (read once) or the store
    tile_bytes = sum(g.d_out_pad * g.d_in_pad for g in grids) * (5 if "int8" in quants else 4)
    in_ram = tile_bytes <= HOST_TILES_LIMIT if cfg.tiles_in_ram is None else cfg.tiles_in_ram
    source = HostTiles(adapter, int8="int8" in quants) if in_ram else adapter
    uniform = UniformGate(source)
    has_gates = all(adapter.read_gate(p) is not None for p in range(adapter.n_pipes))
    gate_info = adapter.gate_settings()

    w = dense_matrix(adapter)
    rows = [bench.dense_row(w)]
    svd_rows, curve = bench.svd_rows(w, grids)
    adapter_rows, checks = bench.adapter_rows(source, uniform, grids, quants)
    rows += svd_rows + adapter_rows
    mark_pareto(rows)
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
    return adapter, pairs, torch_device(device)


@dataclass
class _Bench:
    """One benchmark run's shared inputs; each method's rows come from one method below."""

    held: Heldout  # the evaluated held-out rows
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
        return speed_against_dense(fn, self.dense, self.x1, self.xb, self.cfg.repeats)

    def dense_row(self, w: np.ndarray) -> dict:
        """The dense matrix as one ``F.linear``."""
        wd = torch.from_numpy(w).to(self.device)
        self.dense = lambda t: F.linear(t, wd)
        sp = self.speed(self.dense)
        sp.update(latency_vs_dense=1.0, throughput_vs_dense=1.0)  # by definition (dense against itself is noise)
        row = {"method": "dense", "label": "dense F.linear", "sparsity": None, "quant": "fp32",
               "schedule": None, "rank": None, **self.held.score(self.dense), **sp, "active_bytes": self.dense_bytes,
               "active_vs_dense": 1.0, "peak_cache_bytes": None, "hit_rate": None}
        self.dense_err = row["rel_err"]
        self._tick()
        return row

    def svd_rows(self, w: np.ndarray, grids) -> tuple[list[dict], list[dict]]:
        """Truncated SVDs with the adapter's fp32 active bytes at each ρ, and a quality curve over ranks."""
        n, m = w.shape
        svd = GramSvd.of(w)
        k_max = min(m, n)
        curve = []
        for r in sorted({int(v) for v in np.geomspace(1, k_max, self.cfg.svd_points).round()} | {k_max}):
            a_, b_ = (t.to(self.device) for t in svd.factors(w, r))

            def low_rank(t: torch.Tensor, a_: torch.Tensor = a_, b_: torch.Tensor = b_) -> torch.Tensor:
                return F.linear(F.linear(t, b_), a_)

            s = self.held.score(low_rank)
            curve.append({"rank": r, "active_bytes": 4 * r * (m + n), "rel_err": s["rel_err"], "r2": s["r2"]})
        self._tick()
        rows = []
        for rho in self.cfg.sparsities:
            budget = active_bytes(grids, rho, "fp32")
            r = svd_rank(budget, m, n)
            a_, b_ = (t.to(self.device) for t in svd.factors(w, r))
            fn = lambda t, a_=a_, b_=b_: F.linear(F.linear(t, b_), a_)  # noqa: E731
            rows.append({"method": "svd", "label": f"svd r={r} (bytes of ρ={rho:g})", "sparsity": rho,
                         "quant": "fp32", "schedule": None, "rank": r, **self.held.score(fn), **self.speed(fn),
                         "active_bytes": 4 * r * (m + n), "active_vs_dense": 4 * r * (m + n) / self.dense_bytes,
                         "adapter_bytes": budget, "peak_cache_bytes": None, "hit_rate": None})
            self._tick()
        return rows, curve

    def adapter_rows(self, source, uniform, grids, quants) -> tuple[list[dict], dict]:
        """The runtime at each ρ × tile format × pipe schedule, and the exactness checks."""
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
                for schedule in cfg.schedules:
                    with open_runtime(source, device=dev, sparsity=rho, quant=None if quant == "fp32" else quant,
                                      schedule=schedule) as rt:
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
                    rows.append({"method": "adapter", "label": f"adapter ρ={rho:g} {quant} {schedule}", "sparsity": rho,
                                 "quant": quant, "schedule": schedule, "rank": None, **base, **sp, "active_bytes": act,
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
            assert isinstance(rt, Runtime), "a fitted (ensemble) adapter opens as a Runtime"
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


def mark_pareto(rows: list[dict]) -> None:
    """Flag rows on the quality/bytes Pareto frontier (no other row is at most as big and more accurate)."""
    pts = [(r["active_bytes"], r["rel_err"]) for r in rows]
    for r, (b, e) in zip(rows, pts, strict=True):
        r["pareto"] = not any((b2 <= b and e2 < e) or (b2 < b and e2 <= e) for b2, e2 in pts)

