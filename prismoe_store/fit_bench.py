"""``prismoe benchmark fit``: the fit's speed and memory, as ratios measured in one run.

For each row count the benchmark writes synthetic linear pairs (``x ~ N(0, I)``,
``z = x Wᵀ + 0.01 ε``) and runs :func:`prismoe_store.fit.fit` in a fresh subprocess, which
reports its peak RSS (``ru_maxrss``) and, right before and after the fit, this machine's float32
matrix-multiply rate on a block of the same shape (numpy, best of three). On the largest store it
also times ``dask.array.linalg.lstsq`` (another subprocess). Reported:

- ``flop_ratio``: the fit's useful FLOPs per second over the matmul rate. FLOPs counted:
  ``n·M·(M+1)`` for ``G`` (symmetric), ``2·n·M·N`` for ``B`` (training rows), ``M³/3`` per Cholesky,
  ``2·M²·N`` per solved pipe, ``2·h·M·N`` per distinct pipe's held-out predictions (``h`` rows);
  also the statistics pass alone (``pass_ratio``).
- ``cpu_flop_ratio``: the same with CPU seconds (FLOPs per CPU-second of the fit's process over
  the matmul's), which other processes on a shared machine disturb much less than wall time.
- ``lstsq_time_ratio``: the fit's wall time over ``dask.array.linalg.lstsq`` on the same pairs
  (which fits one dense matrix, no held-out split, no second and third pipe). Without SciPy,
  dask's one small triangular-solve kernel is taken from torch (``torch.linalg.solve_triangular``).
- ``rss_ratio``: peak RSS at the largest row count over that at the smallest (flat: ≈ 1).

Shared machines are noisy: rates are taken in the same process, minutes apart at most. The
default 64 workers keep tiles near the size of the product's 4096→128256 preset (1 MiB here,
4 MiB there); at 512 workers this small matrix has 128 KiB tiles and the fit's time goes to
writing 1536 small chunk files rather than to arithmetic.

>>> r = {"rows": [1], "runs": [{"rows": 1, "fit_s": 1.0, "flop_ratio": 0.8, "pass_ratio": 0.9, "peak_rss_mb": 500.0,
...      "matmul_gflops": 100.0}], "flop_ratio": 0.8, "pass_ratio": 0.9, "cpu_flop_ratio": 0.8,
...      "lstsq_time_ratio": 0.5, "rss_ratio": 1.0,
...      "d_in": 8, "d_out": 8, "cpus": 2, "memory_budget_mb": 64, "lstsq_s": 2.0}
>>> "flop ratio" in format_report(r)
True
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

import numpy as np

from .errors import DataError
from .pairs import PairsStore
from .stores import StoreOptions

_GEN_ROWS = 4096  # rows per generated block

_FIT_SCRIPT = r"""
import json, resource, sys, time
import numpy as np
from prismoe_store.fit import fit

def matmul_rate(m, n, k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((k, m), dtype=np.float32)
    z = rng.standard_normal((k, n), dtype=np.float32)
    best, cpu = 1e9, 1e9
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        x.T @ z
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2.0 * k * m * n / best, 2.0 * k * m * n / cpu

pairs, adapter, budget, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None, int(sys.argv[4])
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from prismoe_store.pairs import PairsStore
p = PairsStore.open(pairs)
m, n = p.d_in, p.d_out
before, cpu_before = matmul_rate(m, min(n, 8192), 4096)
t, c = time.perf_counter(), time.process_time()
a = fit(p, adapter, memory_budget=budget, workers=workers, overwrite=True)
fit_s, fit_cpu = time.perf_counter() - t, time.process_time() - c
after, cpu_after = matmul_rate(m, min(n, 8192), 4096)
info = a.attrs()["fit"]
print(json.dumps({"fit_s": fit_s, "fit_cpu_s": fit_cpu, "timings": info["timings"], "counts": info["counts"],
                  "plan": info["plan"], "matmul_before": before, "matmul_after": after,
                  "matmul_cpu": max(cpu_before, cpu_after), "base_rss_kb": base_rss,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_LSTSQ_SCRIPT = r"""
import json, resource, sys, time
import dask, dask.array as da, dask.array.linalg as dal
import numpy as np, torch
from prismoe_store.pairs import PairsStore
try:
    import scipy.linalg  # noqa: F401  (dask's triangular-solve kernel)
except ImportError:  # SciPy is not a dependency: the same kernel from torch's LAPACK
    def _tri(a, b, lower=False):
        b2 = b[:, None] if b.ndim == 1 else b
        out = torch.linalg.solve_triangular(torch.from_numpy(np.ascontiguousarray(a)),
                                            torch.from_numpy(np.ascontiguousarray(b2)), upper=not lower).numpy()
        return out[:, 0] if b.ndim == 1 else out
    dal.solve_triangular_safe = _tri
    dal._solve_triangular_lower = lambda a, b: _tri(a, b, lower=True)
p = PairsStore.open(sys.argv[1])
x, z = p.dask(row_chunk=4096)
t = time.perf_counter()
w, res, rank, s = da.linalg.lstsq(x, z)
dask.compute(w, res, rank, s, scheduler="threads")
print(json.dumps({"lstsq_s": time.perf_counter() - t,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_pairs(url: str, rows: int, d_in: int, d_out: int, *, seed: int = 0, compressor: str = "zstd") -> PairsStore:
    """Synthetic linear pairs, streamed ``4096`` rows at a time (the same rows for any ``rows``).

    >>> write_pairs("memory://doc-bench-pairs", 10, 4, 3).rows
    10
    """
    store = PairsStore.create(url, d_in=d_in, d_out=d_out, overwrite=True, options=StoreOptions(compressor=compressor))
    w = (np.random.default_rng([seed, 0]).standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    for b, s in enumerate(range(0, rows, _GEN_ROWS)):
        rng = np.random.default_rng([seed, 1, b])
        x = rng.standard_normal((min(_GEN_ROWS, rows - s), d_in), dtype=np.float32)
        store.append(x, x @ w.T + np.float32(0.01) * rng.standard_normal((x.shape[0], d_out), dtype=np.float32))
    return store


def _run(script: str, *args: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise DataError(f"benchmark subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_flops(d_in: int, d_out: int, counts: dict, mode: str = "joint") -> tuple[float, float]:
    """``(statistics-pass FLOPs, all FLOPs)`` of a default fit (see the module docstring).

    >>> fit_flops(2, 3, {"train": 10, "sub": 6, "holdout": 1})[0]
    180.0
    """
    m, n = float(d_in), float(d_out)
    train, hold = counts["train"], counts["holdout"]
    stats = train * m * (m + 1) + 2 * train * m * n
    solved = 2 if mode == "joint" else 3  # joint: pipe 3 copies pipe 1's solution
    solve = 2 * m ** 3 / 3 + solved * 2 * m * m * n
    metrics = solved * 2 * hold * m * n
    return stats, stats + solve + metrics


def benchmark_fit(*, rows: Sequence[int] = (16384, 65536), d_in: int = 2048, d_out: int = 8192,
                  workers: int = 64, memory_budget: int | None = None, compressor: str = "zstd",
                  workdir: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark (see the module docstring); returns the report as a dict.

    ``memory_budget`` is the fit's (None: its default); ``compressor`` that of the pairs store.
    """
    rows = sorted({int(r) for r in rows})
    if not rows or rows[0] < 16:
        raise DataError(f"row counts must be at least 16, got {rows}")
    say = log or (lambda s: None)
    tmp = workdir or tempfile.mkdtemp(prefix="prismoe-bench-fit-")
    os.makedirs(tmp, exist_ok=True)
    runs = []
    try:
        for r in rows:
            pairs = os.path.join(tmp, f"pairs-{r}")
            say(f"writing {r} synthetic pairs {d_in}→{d_out} ...")
            write_pairs(pairs, r, d_in, d_out, compressor=compressor)
            say(f"fitting {r} rows in a subprocess ...")
            res = _run(_FIT_SCRIPT, pairs, os.path.join(tmp, f"adapter-{r}"), str(memory_budget or 0), str(workers))
            stats_fl, all_fl = fit_flops(d_in, d_out, res["counts"])
            rate = max(res["matmul_before"], res["matmul_after"])
            runs.append({"rows": r, "fit_s": res["fit_s"], "timings": res["timings"], "plan": res["plan"],
                         "matmul_gflops": rate / 1e9,
                         "matmul_gflops_before_after": [res["matmul_before"] / 1e9, res["matmul_after"] / 1e9],
                         "fit_gflops": all_fl / res["fit_s"] / 1e9,
                         "flop_ratio": all_fl / res["fit_s"] / rate,
                         "cpu_flop_ratio": all_fl / res["fit_cpu_s"] / res["matmul_cpu"],
                         "pass_ratio": stats_fl / res["timings"]["statistics_s"] / rate,
                         "base_rss_mb": res["base_rss_kb"] / 1024, "peak_rss_mb": res["peak_rss_kb"] / 1024})
            if r != rows[-1]:
                shutil.rmtree(pairs, ignore_errors=True)
            shutil.rmtree(os.path.join(tmp, f"adapter-{r}"), ignore_errors=True)
        say("timing dask.array.linalg.lstsq on the largest pairs ...")
        lst = _run(_LSTSQ_SCRIPT, os.path.join(tmp, f"pairs-{rows[-1]}"))
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    last = runs[-1]
    return {"d_in": d_in, "d_out": d_out, "rows": rows, "workers": workers, "cpus": os.cpu_count(),
            "memory_budget_mb": (memory_budget or 0) / 2 ** 20, "compressor": compressor, "runs": runs,
            "flop_ratio": last["flop_ratio"], "pass_ratio": last["pass_ratio"],
            "cpu_flop_ratio": last["cpu_flop_ratio"],
            "lstsq_s": lst["lstsq_s"], "lstsq_peak_rss_mb": lst["peak_rss_kb"] / 1024,
            "lstsq_time_ratio": last["fit_s"] / lst["lstsq_s"],
            "rss_ratio": last["peak_rss_mb"] / runs[0]["peak_rss_mb"]}


def format_report(r: dict) -> str:
    """The report as a few readable lines."""
    budget = f"{r['memory_budget_mb']:.0f} MiB" if r["memory_budget_mb"] else "default"
    lines = [f"fit benchmark: {r['d_in']}→{r['d_out']}, {r.get('workers', '?')} workers per pipe, rows {r['rows']}, "
             f"{r['cpus']} CPUs, memory budget {budget}, pairs {r.get('compressor', 'zstd')}-compressed"]
    for run in r["runs"]:
        lines.append(f"  {run['rows']:>9d} rows: fit {run['fit_s']:.2f} s, flop ratio {run['flop_ratio']:.2f} "
                     f"(pass {run['pass_ratio']:.2f}) of {run['matmul_gflops']:.0f} GFLOP/s float32 matmul, "
                     f"peak RSS {run['peak_rss_mb']:.0f} MiB")
    lines.append(f"  flop ratio (largest): {r['flop_ratio']:.2f} (target ≥ 0.7); statistics pass alone "
                 f"{r['pass_ratio']:.2f}; per CPU-second {r.get('cpu_flop_ratio', float('nan')):.2f}")
    lines.append(f"  time vs dask.array.linalg.lstsq: {r['lstsq_time_ratio']:.2f}× ({r['lstsq_s']:.2f} s for lstsq)")
    lines.append(f"  peak RSS largest/smallest rows: {r['rss_ratio']:.3f} (target ≤ 1.10)")
    return "\n".join(lines)
