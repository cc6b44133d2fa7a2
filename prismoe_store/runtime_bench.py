"""The runtime benchmark: speed as ratios to a dense ``F.linear``, INT8 vs fp32, hit rate vs cache
budget, and serial vs parallel peak cache bytes — all measured in one run on one device.

Timings are medians of interleaved repeats (dense, runtime, dense, runtime, ...), so the ratios
compare like with like on a shared, noisy machine. The dense baseline is one float32 matrix of
the adapter's full size, ``Σ_p α_p W_p`` (what the adapter computes at ρ = 1).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     a = synthetic_adapter(d + "/a.zarr", d_in=32, d_out=64, workers=8)
...     r = benchmark_runtime(a, repeats=1, batch=4, hit_tokens=1, budgets=(1.0,))
>>> sorted(r)
['device', 'fp32', 'hit_rate', 'int8', 'modes', 'shape', 'sparsity']
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import AdapterStore, TileSource
from .grid import plan_pipes
from .quant import int8_ready, quantize_adapter
from .runtime import open_runtime

BUDGETS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # cache budgets as shares of every tile
HOST_MEMO_LIMIT = 2 << 30  # the hit-rate sweep serves tiles from host RAM below this adapter size


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


def benchmark_runtime(adapter: TileSource, *, device: str = "cpu", sparsity: float = 0.3,
                      tokens: np.ndarray | None = None, batch: int = 64, repeats: int = 5, hit_tokens: int = 32,
                      budgets: Sequence[float] = BUDGETS, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Run every measurement; returns a JSON-ready dict (see :func:`format_report` for its meaning).

    ``tokens`` are input rows ``[n, d_in]`` (default: Gaussian); the first ``batch`` are the
    throughput batch, the first one the latency token, and ``2 * hit_tokens`` rows (one token a
    call, like decoding) drive the hit-rate sweep: the first half warms the cache, the second is
    measured.
    """
    need = max(batch, 2 * hit_tokens)
    if tokens is None:
        tokens = np.random.default_rng(seed).standard_normal((need, adapter.d_in), dtype=np.float32)
    tokens = np.asarray(tokens, np.float32)
    if tokens.shape[0] < need:
        tokens = np.resize(tokens, (need, adapter.d_in))  # cycle the rows given
    steps = 4 + len(budgets)  # speed (fp32, INT8), one per budget, two modes
    step = 0

    def tick():
        nonlocal step
        step += 1
        if progress:
            progress(step, steps)

    x1 = torch.from_numpy(tokens[:1]).to(device)  # [1, M]
    xb = torch.from_numpy(tokens[:batch]).to(device)  # [batch, M]
    dense = _dense_matrix(adapter).to(device)  # [N, M]
    out = {"device": str(torch.device(device)), "sparsity": sparsity,
           "shape": {"d_in": adapter.d_in, "d_out": adapter.d_out, "batch": batch,
                     "grids": [str(g) for g in adapter.grids]}}

    # 1-2. fp32 and INT8 runtimes (warm caches with room for everything) against dense F.linear,
    # timed interleaved in one loop so that all three see the same machine load
    runtimes = {"fp32": open_runtime(adapter, device=device, sparsity=sparsity)}
    if int8_ready(adapter):
        runtimes["int8"] = open_runtime(adapter, device=device, sparsity=sparsity, quant="int8")
    ys = {q: rt(xb) for q, rt in runtimes.items()}  # warm: every tile the batch selects is now resident
    out.update(_speed(runtimes, dense, x1, xb, repeats))
    for q, rt in runtimes.items():
        out[q]["bytes_all_tiles"] = rt.total_bytes
        rt.close()
    if "int8" in runtimes:
        s8, s32 = out["int8"], out["fp32"]
        s8["rel_error_vs_fp32"] = float(torch.linalg.norm(ys["int8"] - ys["fp32"]) / torch.linalg.norm(ys["fp32"]))
        s8["latency_vs_fp32"] = s8["latency_s"] / s32["latency_s"]
        s8["throughput_vs_fp32"] = s8["throughput_tok_s"] / s32["throughput_tok_s"]
        s8["bytes_vs_fp32"] = s8["bytes_all_tiles"] / s32["bytes_all_tiles"]
    else:
        out["int8"] = None  # run `prismoe quantize` on the adapter to include it
    tick()
    tick()

    # 3. hit rate against the cache budget (one token a call, cold cache, second half measured)
    source = _HostTiles(adapter) if out["fp32"]["bytes_all_tiles"] <= HOST_MEMO_LIMIT else adapter
    tile = max(4 * g.tile_out * g.tile_in for g in adapter.grids)
    curve = []
    for share in budgets:
        budget = max(tile, int(share * out["fp32"]["bytes_all_tiles"]))
        with open_runtime(source, device=device, sparsity=sparsity, cache_bytes=budget) as rt:
            for t in range(hit_tokens):
                rt(tokens[t:t + 1])
            rt.reset_stats()
            for t in range(hit_tokens, 2 * hit_tokens):
                rt(tokens[t:t + 1])
            s = rt.stats()["cache"]
        curve.append({"share": share, "budget_bytes": budget, "hit_rate": s["hit_rate"],
                      "bytes_loaded_per_token": s["bytes_loaded"] / hit_tokens, "peak_bytes": s["peak_bytes"]})
        tick()
    out["hit_rate"] = curve

    # 4. serial against parallel: peak cache bytes and time for the same two batches
    modes = {}
    for mode in ("parallel", "serial"):
        with open_runtime(adapter, device=device, sparsity=sparsity, mode=mode) as rt:
            rt(xb)
            rt(xb)
            s = rt.stats()
        modes[mode] = {"peak_bytes": s["cache"]["peak_bytes"], "seconds": s["seconds"],
                       "hit_rate": s["cache"]["hit_rate"]}
        tick()
    modes["serial_vs_parallel_peak"] = modes["serial"]["peak_bytes"] / modes["parallel"]["peak_bytes"]
    modes["serial_vs_parallel_time"] = modes["serial"]["seconds"] / modes["parallel"]["seconds"]
    out["modes"] = modes
    return out


def _dense_matrix(adapter: TileSource) -> torch.Tensor:
    """``Σ_p α_p W_p`` as one float32 ``[d_out, d_in]`` matrix, assembled band by band."""
    w = torch.zeros(adapter.d_out, adapter.d_in)
    for p, (alpha, g) in enumerate(zip(adapter.alphas, adapter.grids)):
        for j in g.active_workers():
            rows, cols = g.valid_region(j)
            tile = torch.from_numpy(np.asarray(adapter.read_tile(p, j)))
            w[rows, cols] += alpha * tile[: rows.stop - rows.start, : cols.stop - cols.start]
    return w


def _speed(runtimes: dict, dense: torch.Tensor, x1: torch.Tensor, xb: torch.Tensor, repeats: int) -> dict:
    """Median latency (batch 1) and throughput (batch ``len(xb)``) of each runtime and of ``F.linear``,
    timed interleaved (dense, then each runtime, every repeat)."""
    sync = torch.cuda.synchronize if dense.is_cuda else (lambda: None)

    def timed(fn, x):
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        return time.perf_counter() - t0

    fns = {"dense": lambda x: F.linear(x, dense), **runtimes}
    t = {name: ([], []) for name in fns}  # name -> (batch-1 times, batch times)
    timed(fns["dense"], x1), timed(fns["dense"], xb)  # warm the dense path too
    for _ in range(repeats):
        for name, fn in fns.items():
            t[name][0].append(timed(fn, x1))
            t[name][1].append(timed(fn, xb))
    m = {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in t.items()}
    n = xb.shape[0]
    (d1, db) = m["dense"]
    return {name: {"latency_s": m[name][0], "dense_latency_s": d1, "latency_vs_dense": m[name][0] / d1,
                   "throughput_tok_s": n / m[name][1], "dense_throughput_tok_s": n / db,
                   "throughput_vs_dense": db / m[name][1], "hit_rate": rt.stats()["cache"]["hit_rate"]}
            for name, rt in runtimes.items()}


class _HostTiles:
    """A TileSource that keeps every tile it has read in host RAM (the sweep measures the cache
    policy, not the store's read speed)."""

    def __init__(self, inner: TileSource):
        self.inner = inner
        self.d_in, self.d_out, self.mode, self.alphas, self.grids = (
            inner.d_in, inner.d_out, inner.mode, inner.alphas, inner.grids)
        self._memo: dict = {}

    def attrs(self) -> dict:
        return self.inner.attrs() if callable(getattr(self.inner, "attrs", None)) else {}

    def read_tile(self, pipe: int, worker: int) -> np.ndarray:
        key = ("fp32", pipe, worker)
        if key not in self._memo:
            self._memo[key] = self.inner.read_tile(pipe, worker)
        return self._memo[key].copy()

    def read_tile_int8(self, pipe: int, worker: int):
        key = ("int8", pipe, worker)
        if key not in self._memo:
            self._memo[key] = self.inner.read_tile_int8(pipe, worker)
        return tuple(a.copy() for a in self._memo[key])

    def read_gate(self, pipe: int):
        return self.inner.read_gate(pipe)


def format_report(r: dict) -> str:
    """The benchmark's numbers as text (ratios first)."""
    threads = f", {r['threads']} CPU threads" if r.get("threads") else ""
    lines = [f"device {r['device']}{threads}, ρ = {r['sparsity']}, {r['shape']['d_in']} → {r['shape']['d_out']}"]
    lines += [f"  pipe {p + 1}: {g}" for p, g in enumerate(r["shape"]["grids"])]
    for q in ("fp32", "int8"):
        s = r.get(q)
        if not s:
            lines.append(f"{q}: no INT8 tiles (run `prismoe quantize`)")
            continue
        lines.append(f"{q}: latency (batch 1) {s['latency_vs_dense']:.2f}× dense F.linear "
                     f"({s['latency_s'] * 1e3:.2f} ms vs {s['dense_latency_s'] * 1e3:.2f} ms); "
                     f"throughput (batch {r['shape']['batch']}) {s['throughput_vs_dense']:.2f}× dense "
                     f"({s['throughput_tok_s']:.0f} vs {s['dense_throughput_tok_s']:.0f} tokens/s)")
    if r.get("int8"):
        s = r["int8"]
        lines.append(f"int8 vs fp32: latency {s['latency_vs_fp32']:.2f}×, throughput {s['throughput_vs_fp32']:.2f}×, "
                     f"cache bytes {s['bytes_vs_fp32']:.2f}×, relative output error {s['rel_error_vs_fp32']:.2e}")
    lines.append("hit rate vs cache budget (one token a call, warm half excluded):")
    for c in r["hit_rate"]:
        lines.append(f"  budget {c['share']:7.2%} of all tiles ({c['budget_bytes'] / 2**20:8.2f} MiB): "
                     f"hit rate {c['hit_rate']:.3f}, {c['bytes_loaded_per_token'] / 2**20:.2f} MiB loaded/token")
    m = r["modes"]
    lines.append(f"serial vs parallel: peak cache bytes {m['serial']['peak_bytes'] / 2**20:.2f} vs "
                 f"{m['parallel']['peak_bytes'] / 2**20:.2f} MiB ({m['serial_vs_parallel_peak']:.2f}×), "
                 f"time {m['serial_vs_parallel_time']:.2f}×")
    return "\n".join(lines)


def plot_hit_rate(r: dict, path) -> None:
    """Hit rate against the cache budget, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [c["share"] for c in r["hit_rate"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([100 * s for s in shares], [c["hit_rate"] for c in r["hit_rate"]], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("cache budget (% of all tiles' bytes)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"tile cache hit rate, ρ = {r['sparsity']}, one token a call")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
