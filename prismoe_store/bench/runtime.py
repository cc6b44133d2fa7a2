"""The runtime benchmark: speed as ratios to a dense ``F.linear`` and to two ways of running the
dense matrix with little device memory, INT8 vs fp32, hit rate and latency against the cache
budget over a decoding trace, and serial vs parallel pipes — all measured in one run on one device.

Baselines, all over the same float32 matrix (``Σ_p α_p W_p`` of a fitted adapter, what it computes
at ρ = 1; the head's own matrix in token order for a head adapter):

- **dense** — the whole matrix resident on the device, one ``F.linear``;
- **offload** — naive offloading: the whole matrix copied from host memory to the device on every
  call, then ``F.linear`` (on the CPU: a fresh copy of the matrix each call);
- **host** — the matrix kept in host memory and multiplied there (on the CPU: the same as dense).

Timings are interleaved repeats (dense, offload, host, runtimes, dense, ...); each ratio is the
median of the ratios taken within a repeat, with their quartiles as its spread, so the ratios
compare like with like on a shared, noisy machine. The hit-rate sweep runs the rows given
one per call, in order (a decoding trace: consecutive tokens of real text), against device budgets
that hold a share of all tiles; misses are served from the host tier holding every tile
(decompressed), the first half of the trace warms the cache and the second is measured, each call
timed against a dense call on the same token.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     a = synthetic_adapter(d + "/a.zarr", d_in=32, d_out=64, workers=8)
...     r = benchmark_runtime(a, repeats=1, batch=4, hit_tokens=1, budgets=(1.0,))
>>> sorted(r)  # doctest: +NORMALIZE_WHITESPACE
['allocator', 'baselines', 'device', 'fp32', 'hit_rate', 'hit_tokens', 'host_tier_bytes', 'int8', 'kind',
 'schedules', 'shape', 'sparsity']
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prismoe_store.bench.timing import steady_heap
from prismoe_store.errors import DataError
from prismoe_store.grid import plan_pipes
from prismoe_store.runtime.bands import SelectRuntime
from prismoe_store.runtime.dense import dense_matrix
from prismoe_store.runtime.open import open_runtime
from prismoe_store.runtime.quant import int8_ready, quantize_adapter
from prismoe_store.runtime.tile_source import TileSource
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import open_rows

BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # device budgets as shares of every tile
HOST_TIER_LIMIT = 4 << 30  # the hit-rate sweep holds every tile in the host tier below this size


def synthetic_adapter(url, *, d_in: int = 512, d_out: int = 8192, workers: int = 128, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> AdapterStore:
    """A finished three-pipe adapter of random tiles (``N(0, 1/d_in)``) and random gates, with INT8 tiles."""
    grids = plan_pipes(d_in, d_out, workers)
    a = AdapterStore.create(url, grids=grids, overwrite=True)
    rng = np.random.default_rng(seed)
    total = sum(g.rows for g in grids)
    done = 0
    for p, g in enumerate(grids):
        for r in range(g.rows):
            a.write_band(p, r, rng.standard_normal((g.tile_out, g.d_in_pad), dtype=np.float32) / np.sqrt(d_in))
            done += 1
            if progress:
                progress(done, total)
        a.write_gate(p, rng.standard_normal((g.workers, d_in), dtype=np.float32) / np.sqrt(d_in),
                     np.zeros(g.workers, np.float32))
    a.update_attrs(complete=True, synthetic={"seed": seed})
    quantize_adapter(a)
    return a


def is_head(adapter: TileSource) -> bool:
    """Whether ``adapter`` is a head adapter (``partition`` layout, bands behind one gate)."""
    return adapter.layout == "partition"


def benchmark_runtime(adapter: TileSource, *, device: str = "cpu", sparsity: float | None = None,
                      mass: float | None = None, tokens: np.ndarray | None = None, batch: int = 64,
                      repeats: int = 5, hit_tokens: int = 32, budgets: Sequence[float] = BUDGETS, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Run every measurement; returns a JSON-ready dict (see :func:`format_report` for its meaning).

    ``tokens`` are input rows ``[n, d_in]`` in trace order (default: Gaussian; another width raises
    :class:`~prismoe_store.errors.DataError`); the first ``batch``
    are the throughput batch, the first one the latency token, and ``2 * hit_tokens`` rows (one
    token a call, like decoding) drive the hit-rate sweep. ``sparsity`` / ``mass``: the runtime's
    (None: what the adapter records). Works on fitted and head adapters alike. Everything is
    timed under :func:`~prismoe_store.bench.timing.steady_heap` (``allocator`` in the report).
    """
    with steady_heap() as allocator:
        out = _measure(adapter, device, sparsity, mass, tokens, batch, repeats, hit_tokens, budgets, seed, progress)
    out["allocator"] = allocator
    return out


def _measure(adapter: TileSource, device: str, sparsity: float | None, mass: float | None, tokens: np.ndarray | None,
             batch: int, repeats: int, hit_tokens: int, budgets: Sequence[float], seed: int,
             progress: Callable[[int, int], None] | None) -> dict:
    need = max(batch, 2 * hit_tokens)
    if tokens is None:
        tokens = np.random.default_rng(seed).standard_normal((need, adapter.d_in), dtype=np.float32)
    tokens = np.asarray(tokens, np.float32)
    if tokens.ndim != 2 or tokens.shape[1] != adapter.d_in or not len(tokens):
        raise DataError(f"token rows must be [n, {adapter.d_in}] (the adapter's d_in), got {tokens.shape}")
    if tokens.shape[0] < need:
        tokens = np.resize(tokens, (need, adapter.d_in))  # cycle the rows given
    head = is_head(adapter)
    steps = 2 + len(budgets) + (0 if head else 2)
    step = 0

    def tick():
        nonlocal step
        step += 1
        if progress:
            progress(step, steps)

    dev = torch.device(device)
    x1 = torch.from_numpy(tokens[:1]).to(dev)  # [1, M]
    xb = torch.from_numpy(tokens[:batch]).to(dev)  # [batch, M]
    host = torch.from_numpy(dense_matrix(adapter))  # [N, M] float32 on the host
    dense = host.to(dev)
    opts: dict[str, Any] = dict(device=device, sparsity=sparsity, mass=mass)
    runtimes = {"fp32": open_runtime(adapter, **opts)}
    if int8_ready(adapter):
        runtimes["int8"] = open_runtime(adapter, **opts, quant="int8")
    first = next(iter(runtimes.values()))
    grids = [str(g) for g in adapter.grids]
    if head:
        assert isinstance(first, SelectRuntime), "open_runtime opens a head adapter as a SelectRuntime"
        grids, mass = [f"{first.n_bands} bands of {first.band_rows} rows"], first.mass
    out: dict[str, Any] = {"device": str(dev), "kind": "head" if head else "fitted", "sparsity": first.sparsity,
                           "shape": {"d_in": adapter.d_in, "d_out": adapter.d_out, "batch": batch, "grids": grids}}
    if head:
        out["mass"] = mass

    # 1-2. fp32 and INT8 runtimes (warm: every tile the batch selects is resident) against the
    # baselines, timed interleaved in one loop so that all see the same machine load
    ys = {q: rt(xb) for q, rt in runtimes.items()}
    for rt in runtimes.values():
        rt.reset_stats()
    baselines = {"dense": lambda x: F.linear(x, dense),
                 "offload": lambda x: F.linear(x, host.to(dev, copy=True)),
                 "host": lambda x: F.linear(x.to("cpu"), host).to(dev)}
    speed = _speed({**baselines, **runtimes}, x1, xb, repeats, dev)
    out["baselines"] = {k: speed[k] for k in baselines}
    for q, rt in runtimes.items():
        out[q] = {**speed[q], "bytes_all_tiles": rt.total_bytes, "row_share": rt.stats().get("row_share"),
                  "hit_rate": rt.stats()["cache"]["hit_rate"]}
        rt.close()
    if "int8" in runtimes:
        s8, s32 = out["int8"], out["fp32"]
        finite = torch.isfinite(ys["fp32"])
        diff, ref = (ys["int8"] - ys["fp32"])[finite], ys["fp32"][finite]
        s8["rel_error_vs_fp32"] = float(torch.linalg.norm(diff) / torch.linalg.norm(ref))
        s8["latency_vs_fp32"] = s8["latency_s"] / s32["latency_s"]
        s8["throughput_vs_fp32"] = s8["throughput_tok_s"] / s32["throughput_tok_s"]
        s8["bytes_vs_fp32"] = s8["bytes_all_tiles"] / s32["bytes_all_tiles"]
    else:
        out["int8"] = None  # run `prismoe quantize` on the adapter to include it
    tick()
    tick()

    # 3. hit rate and latency against the device budget over the trace (one token a call)
    total = out["fp32"]["bytes_all_tiles"]
    host_tier = total if total <= HOST_TIER_LIMIT else 0
    out["host_tier_bytes"] = host_tier
    out["hit_tokens"] = hit_tokens  # tokens measured per budget, after as many warm-up tokens
    curve = []
    for share in budgets:
        budget = int(share * total) if share < 1 else None
        try:
            rt = open_runtime(adapter, **opts, cache_bytes=budget, host_cache_bytes=host_tier, prefetch=True)
        except Exception as e:  # a budget below one tile: reported, not fatal
            curve.append({"share": share, "error": str(e)})
            tick()
            continue
        with rt:
            for t in range(hit_tokens):
                rt(tokens[t:t + 1])
            rt.reset_stats()
            t_rt, t_dense = [], []
            for t in range(hit_tokens, 2 * hit_tokens):
                xt = torch.from_numpy(tokens[t:t + 1]).to(dev)
                t_dense.append(_timed(baselines["dense"], xt, dev))
                t_rt.append(_timed(rt, xt, dev))
            s = rt.stats()
        curve.append({"share": share, "budget_bytes": s["cache"]["budget_bytes"], "hit_rate": s["cache"]["hit_rate"],
                      "bytes_loaded_per_token": s["cache"]["bytes_loaded"] / hit_tokens,
                      "peak_bytes": s["cache"]["peak_bytes"], "prefetched": s["host"]["prefetched"],
                      "prefetch_hit_rate": s["host"]["prefetch_hit_rate"],
                      "latency_vs_dense": statistics.median(t_rt) / statistics.median(t_dense)})
        tick()
    out["hit_rate"] = curve

    # 4. serial against parallel pipe schedules (fitted adapters): peak cache bytes and time for two batches
    out["schedules"] = None if head else _schedules(adapter, device, sparsity, xb, tick)
    return out


def benchmark_runtime_store(adapter: AdapterStore | str | None, *, rows: str | None = None, d_in: int = 512,
                            d_out: int = 8192, workers: int = 512, threads: int | None = None, stage=None,
                            **options) -> dict:
    """:func:`benchmark_runtime` as ``prismoe benchmark runtime`` runs it: ``adapter`` a finished
    adapter store (open, or its path/URL), or ``None`` for a synthetic three-pipe ``d_in → d_out`` adapter of
    ``workers`` tiles a pipe built in a temporary folder (at ρ = 0.3 unless ``sparsity`` is given);
    ``rows`` a ``.npy`` or pairs store of input rows in trace order (``None``: Gaussian), checked
    against the adapter's width before any work; ``threads`` the torch CPU threads (left as set
    after the run). ``stage(name, unit)`` opens a context giving a ``progress(done, total)``
    callback (or ``None``); ``options`` go to :func:`benchmark_runtime`. The report also names
    ``adapter``, ``input``, ``threads`` and ``load`` (the 1-minute load average before and after)."""
    stage = stage or (lambda name, unit: nullcontext(None))
    load = os.getloadavg()[0]  # other work on the machine makes the ratios noisy: reported
    if threads:
        torch.set_num_threads(threads)
    store = adapter if isinstance(adapter, AdapterStore) or adapter is None else AdapterStore.open(
        adapter, require_complete=True)
    tokens = None
    if rows:  # rows as wide as the adapter's input, checked before any work
        read, n = open_rows(rows, d_in if store is None else store.d_in)
        tokens = read(0, min(n, max(options.get("batch", 64), 2 * options.get("hit_tokens", 32))))
    with tempfile.TemporaryDirectory(prefix="prismoe-bench-") as tmp:
        if store is None:
            with stage("synthetic adapter", "band") as progress:
                store = synthetic_adapter(os.path.join(tmp, "adapter.zarr"), d_in=d_in, d_out=d_out,
                                          workers=workers, progress=progress)
            options["sparsity"] = 0.3 if options.get("sparsity") is None else options["sparsity"]
        with stage("benchmark", "step") as progress:
            report = benchmark_runtime(store, tokens=tokens, progress=progress, **options)
    report["adapter"] = adapter.url if isinstance(adapter, AdapterStore) else (
        adapter or f"synthetic {d_in}→{d_out}, {workers} workers a pipe")
    report["input"] = rows or "Gaussian"
    report["threads"] = torch.get_num_threads()
    report["load"] = [load, os.getloadavg()[0]]  # 1-minute load average before and after
    return report


def write_outputs(report: dict, *, markdown=None, plots=None) -> list[str]:
    """Write the report's Markdown tables to ``markdown`` (a file) and ``hit_rate.png`` into
    ``plots`` (a folder, made if missing); returns the paths written (plots first), and lists the
    plots in ``report["plots"]``."""
    written = []
    if plots:
        os.makedirs(plots, exist_ok=True)
        report["plots"] = [os.path.join(plots, "hit_rate.png")]
        plot_hit_rate(report, report["plots"][0])
        written += report["plots"]
    if markdown:
        with open(markdown, "w") as f:
            f.write(format_markdown(report) + "\n")
        written.append(str(markdown))
    return written


def _schedules(adapter, device, sparsity, xb, tick) -> dict:
    out = {}
    for schedule in ("parallel", "serial"):
        with open_runtime(adapter, device=device, sparsity=sparsity, schedule=schedule) as rt:
            rt(xb)
            rt(xb)
            s = rt.stats()
        out[schedule] = {"peak_bytes": s["cache"]["peak_bytes"], "seconds": s["seconds"],
                         "hit_rate": s["cache"]["hit_rate"]}
        tick()
    out["serial_vs_parallel_peak"] = out["serial"]["peak_bytes"] / out["parallel"]["peak_bytes"]
    out["serial_vs_parallel_time"] = out["serial"]["seconds"] / out["parallel"]["seconds"]
    return out


def _timed(fn, x, dev: torch.device) -> float:
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - t0


def _speed(fns: dict, x1: torch.Tensor, xb: torch.Tensor, repeats: int, dev: torch.device) -> dict:
    """Median latency (batch 1) and throughput (batch ``len(xb)``) of each callable, timed interleaved
    (every callable once per repeat), with ratios to ``fns["dense"]``: each ratio is taken within a
    repeat (both timings of the same moment of the machine), the median of those is the figure and
    their quartiles its spread (``*_quartiles``, [25 %, 75 %]), so the figure always lies inside it.

    >>> r = _speed({"dense": lambda x: x, "other": lambda x: x}, torch.ones(1, 2), torch.ones(4, 2), 3,
    ...            torch.device("cpu"))
    >>> sorted(r["other"])  # doctest: +NORMALIZE_WHITESPACE
    ['dense_latency_s', 'dense_throughput_tok_s', 'latency_s', 'latency_vs_dense', 'latency_vs_dense_quartiles',
     'throughput_tok_s', 'throughput_vs_dense', 'throughput_vs_dense_quartiles']
    >>> q = r["other"]["latency_vs_dense_quartiles"]; q[0] <= r["other"]["latency_vs_dense"] <= q[1]
    True
    """
    # name -> (batch-1 times, batch times)
    t: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for fn in fns.values():  # warm every path
        _timed(fn, x1, dev), _timed(fn, xb, dev)
    for _ in range(repeats):
        for name, fn in fns.items():
            t[name][0].append(_timed(fn, x1, dev))
            t[name][1].append(_timed(fn, xb, dev))
    m = {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in t.items()}
    n = xb.shape[0]
    (d1, db), (t1, tb) = m["dense"], t["dense"]

    def ratios(mine: list[float], dense: list[float], inverse: bool = False) -> tuple[float, list[float]]:
        r = [(b / a) if inverse else (a / b) for a, b in zip(mine, dense, strict=True)]  # one per repeat
        return float(np.median(r)), np.percentile(r, [25, 75]).tolist()

    out = {}
    for name in fns:
        lat, lat_q = ratios(t[name][0], t1)
        thr, thr_q = ratios(t[name][1], tb, inverse=True)
        out[name] = {"latency_s": m[name][0], "dense_latency_s": d1, "latency_vs_dense": lat,
                     "latency_vs_dense_quartiles": lat_q, "throughput_tok_s": n / m[name][1],
                     "dense_throughput_tok_s": n / db, "throughput_vs_dense": thr,
                     "throughput_vs_dense_quartiles": thr_q}
    return out


def format_report(r: dict) -> str:
    """The benchmark's numbers as text (ratios first)."""
    threads = f", {r['threads']} CPU thread{'s' * (r['threads'] != 1)}" if r.get("threads") else ""
    rho = f"ρ = {r['sparsity']}" + (f", mass {r['mass']}" if r.get("mass") else "")
    lines = [f"{r['kind']} adapter, device {r['device']}{threads}, {rho}, {r['shape']['d_in']} → {r['shape']['d_out']}"]
    if r.get("load"):
        lines.append(f"  machine load (1-minute average) {r['load'][0]:.2f} before, {r['load'][1]:.2f} after: "
                     f"with other work running the ratios move from run to run")
    lines += [f"  {g}" for g in r["shape"]["grids"]]
    if r.get("allocator"):
        lines.append(f"  timed with {r['allocator']}")
    lines.append("  each ratio to dense is the median of the ratios taken within each repeat, not the ratio of the "
                 "median times printed beside it")
    batch = r["shape"]["batch"]
    what = {"offload": "the whole matrix copied to the device every call",
            "host": "the matrix kept in host memory and multiplied there"
                    + ("; on a CPU that is the dense product itself" if r["device"] == "cpu" else "")}
    for name, s in r["baselines"].items():
        if name != "dense":
            lines.append(f"{name} baseline ({what.get(name, name)}): latency {s['latency_vs_dense']:.2f}× dense"
                         f"{_bracketed(_spread(s, 'latency'))}, throughput {s['throughput_vs_dense']:.2f}× dense"
                         f"{_bracketed(_spread(s, 'throughput'))}")
    for q in ("fp32", "int8"):
        s = r.get(q)
        if not s:
            lines.append(f"{q}: no INT8 tiles (run `prismoe quantize`)")
            continue
        share = f", {s['row_share']:.1%} of the rows a token" if s.get("row_share") else ""
        lines.append(f"{q}: latency (batch 1) {s['latency_vs_dense']:.2f}× dense F.linear "
                     f"({'; '.join(filter(None, [_spread(s, 'latency'), 'median times']))} "
                     f"{s['latency_s'] * 1e3:.2f} ms and dense {s['dense_latency_s'] * 1e3:.2f} ms); "
                     f"throughput (batch {batch}) {s['throughput_vs_dense']:.2f}× dense "
                     f"({'; '.join(filter(None, [_spread(s, 'throughput'), 'median rates']))} "
                     f"{s['throughput_tok_s']:.0f} and dense {s['dense_throughput_tok_s']:.0f} tokens/s){share}")
    if r.get("int8"):
        s = r["int8"]
        lines.append(f"int8 vs fp32 (ratios of the median times): latency {s['latency_vs_fp32']:.2f}×, "
                     f"throughput {s['throughput_vs_fp32']:.2f}×, "
                     f"cache bytes {s['bytes_vs_fp32']:.2f}×, relative output error {s['rel_error_vs_fp32']:.2e}")
    tiered = bool(r.get("host_tier_bytes", 1))  # reports written before the key had a host tier
    source = "the host tier" if tiered else "the store (no host tier for an adapter this large)"
    n = r.get("hit_tokens")
    trace = (f"a trace of {2 * n} tokens (one token a call; the first {n} warm the cache and are not counted"
             if n else "the trace (one token a call; its first half warms the cache and is not counted")
    lines.append(f"device budget sweep over {trace}; misses are loaded from {source}, so at a budget that holds every "
                 "tile they are tiles the warm half never used):")
    ahead = any(c.get("prefetched") for c in r["hit_rate"])
    for c in r["hit_rate"]:
        if "error" in c:
            lines.append(f"  budget {c['share']:7.2%}: {c['error']}")
            continue
        lines.append(f"  budget {c['share']:7.2%} of all tiles ({c['budget_bytes'] / 2**20:8.2f} MiB): "
                     f"hit rate {c['hit_rate']:.3f}, latency {c['latency_vs_dense']:.2f}× dense, "
                     f"{c['bytes_loaded_per_token'] / 2**20:.2f} MiB loaded/token"
                     + (f", {c['prefetched']} tiles read ahead into the host tier" if ahead else "")
                     + (f" (prefetch hit rate {c['prefetch_hit_rate']:.2f})" if c["prefetched"] else ""))
    if r["hit_rate"] and not ahead:
        lines.append("  no tile was read ahead: " + ("the tiles prefetch predicts (the last token's, the most used) "
                     "were in the host tier already" if tiered
                     else "prefetch reads into the host tier, which is off"))
    m = r.get("schedules")
    if m:
        lines.append(f"serial vs parallel: peak cache bytes {m['serial']['peak_bytes'] / 2**20:.2f} vs "
                     f"{m['parallel']['peak_bytes'] / 2**20:.2f} MiB ({m['serial_vs_parallel_peak']:.2f}×), "
                     f"time {m['serial_vs_parallel_time']:.2f}×")
    return "\n".join(lines)


def _spread(s: dict, what: str) -> str:
    """``"middle half of the repeats 1.52–1.71×"`` from a ratio's quartiles (empty without them)."""
    q = s.get(f"{what}_vs_dense_quartiles")
    return f"middle half of the repeats {q[0]:.2f}–{q[1]:.2f}×" if q else ""


def _bracketed(text: str) -> str:
    """``" (text)"``, or nothing for no text."""
    return f" ({text})" if text else ""


def format_markdown(r: dict) -> str:
    """The numbers as a Markdown table (one row per way of computing the product)."""
    batch = r["shape"]["batch"]
    rows = [f"| way | latency (batch 1) vs dense | throughput (batch {batch}) vs dense |", "|---|---|---|"]

    def cell(s: dict, what: str) -> str:
        q = s.get(f"{what}_vs_dense_quartiles")
        return f"{s[f'{what}_vs_dense']:.2f}×" + (f" ({q[0]:.2f}–{q[1]:.2f})" if q else "")

    for name, s in [*r["baselines"].items(), *((q, r[q]) for q in ("fp32", "int8") if r.get(q))]:
        rows.append(f"| {name} | {cell(s, 'latency')} | {cell(s, 'throughput')} |")
    rows.append("")
    rows.append("Each ratio is the median of the ratios taken within each interleaved repeat; "
                "in brackets their quartiles.")
    rows += ["", "| device budget | hit rate | latency vs dense | tiles read ahead | prefetch hit rate |",
             "|---|---|---|---|---|"]
    for c in r["hit_rate"]:
        if "error" not in c:
            rate = f"{c['prefetch_hit_rate']:.2f}" if c["prefetched"] else "–"
            rows.append(f"| {c['share']:.2%} | {c['hit_rate']:.3f} | {c['latency_vs_dense']:.2f}× | "
                        f"{c['prefetched']} | {rate} |")
    return "\n".join(rows)


def plot_hit_rate(r: dict, path) -> None:
    """Hit rate and latency against the device budget, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [c for c in r["hit_rate"] if "error" not in c]
    shares = [100 * c["share"] for c in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(shares, [c["hit_rate"] for c in curve], marker="o", label="hit rate")
    ax.set_xscale("log")
    ax.set_xlabel("device budget (% of all tiles' bytes)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(shares, [c["latency_vs_dense"] for c in curve], marker="s", color="tab:red", label="latency")
    ax2.axhline(1.0, color="tab:red", lw=0.8, ls=":")
    ax2.set_ylabel("latency / dense F.linear", color="tab:red")
    ax.set_title(f"{r['kind']} adapter, ρ = {r['sparsity']}, one token a call")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
