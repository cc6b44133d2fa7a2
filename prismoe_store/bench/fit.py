"""``prismoe benchmark fit``: the whole ``prismoe fit`` command's speed and memory, as ratios measured in one run.

For each row count the benchmark writes synthetic linear pairs (``x ~ N(0, I)``,
``z = x Wᵀ + 0.01 ε``, in a pairs store of the default encoding) and runs the real command,
``prismoe fit PAIRS -o ADAPTER --json``, in a fresh process timed from its start to its exit:
imports, opening the store, the statistics pass (reading, decoding, products, reduction), the
solves, writing the tiles and the held-out metrics. Right before and after each fit this
process measures the machine's float32 matrix-multiply rate on a block of the same shape (numpy,
best of three). ``repeats`` runs every row count that many times, interleaved (r₁, r₂, r₁, r₂, …),
so a busy moment of a shared machine does not fall on one size only; before each run the
written data is flushed to disk (``os.sync``), so the kernel's write-back of the pairs just written
and of the last run's adapter does not take the cores while a fit is timed. Reported per run, and
the best run per row count:

- ``flop_ratio``: the command's useful FLOPs per wall second over the matmul rate (the higher of
  the rates just before and after that run, so a slow moment of the machine never flatters the
  fit). FLOPs counted: ``n·M·(M+1)`` for ``G`` (symmetric), ``2·n·M·N`` for ``B`` (training rows),
  ``M³/3`` per Cholesky, ``2·M²·N`` per solved pipe, ``2·h·M·N`` per distinct pipe's held-out
  predictions (``h`` rows); ``pass_ratio`` is the statistics pass alone (the fit's own timing).
- ``cpu_flop_ratio``: the same with CPU seconds (FLOPs per CPU-second of the fit's process over
  the matmul's), which other processes on a shared machine disturb less than wall time.
- ``stages``: wall seconds of the pass, the solves (with writing the tiles), the metrics, and the
  rest of the process (start-up: imports, opening the store, the plan; the report).
- ``peak_rss_mb`` of the fit's process (``wait4``'s ``ru_maxrss``) and ``rss_ratio``: at the largest
  row count over the smallest (flat: ≈ 1).
- ``load``: the 1-minute load average before each run (other work on the machine).

With ``lstsq`` it also times ``dask.array.linalg.lstsq`` on the largest pairs (another process):
``lstsq_time_ratio`` is the fit's wall time over it (lstsq fits one dense matrix, no held-out
split, no second and third pipe; without SciPy its triangular-solve kernel comes from torch).

The default 64 workers keep tiles near the size of the product's 4096→128256 preset (1 MiB here,
4 MiB there); at 512 workers this small matrix has 128 KiB tiles and the fit's time goes to
writing 1536 small chunk files rather than to arithmetic.

>>> run = {"rows": 1, "fit_s": 1.0, "flop_ratio": 0.8, "pass_ratio": 0.9, "cpu_flop_ratio": 0.8, "peak_rss_mb": 500.0,
...        "matmul_gflops": 100.0, "load": 1.0, "stages": {"pass": 0.6, "solve": 0.1, "metrics": 0.1, "rest": 0.2}}
>>> r = {"rows": [1], "runs": [run], "best": [run], "flop_ratio": 0.8, "pass_ratio": 0.9, "cpu_flop_ratio": 0.8,
...      "rss_ratio": 1.0, "d_in": 8, "d_out": 8, "cpus": 2, "memory_budget_mb": 64, "precision": "mixed"}
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
import time
from collections.abc import Callable, Sequence

import numpy as np

from prismoe_store.errors import DataError
from prismoe_store.fit.runner import usable_cpus
from prismoe_store.stores.formats import Compressor, StoreOptions
from prismoe_store.stores.pairs import PAIRS_OPTIONS, PairsStore

_GEN_ROWS = 4096  # rows per generated block
_MATMUL_ROWS = 4096  # rows of the timed matmul block

_LSTSQ_SCRIPT = r"""
import json, resource, sys, time
import dask, dask.array as da, dask.array.linalg as dal
import numpy as np, torch
from prismoe_store.stores.pairs import PairsStore
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


def write_pairs(url: str, rows: int, d_in: int, d_out: int, *, seed: int = 0,
                compressor: Compressor | None = None) -> PairsStore:
    """Synthetic linear pairs, streamed ``4096`` rows at a time (the same rows for any ``rows``);
    ``compressor`` None: the pairs store default (:data:`prismoe_store.stores.pairs.PAIRS_OPTIONS`).

    >>> write_pairs("memory://doc-bench-pairs", 10, 4, 3).rows
    10
    """
    options = PAIRS_OPTIONS if compressor is None else StoreOptions(compressor=compressor)
    store = PairsStore.create(url, d_in=d_in, d_out=d_out, overwrite=True, options=options)
    w = (np.random.default_rng([seed, 0]).standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    for b, s in enumerate(range(0, rows, _GEN_ROWS)):
        rng = np.random.default_rng([seed, 1, b])
        x = rng.standard_normal((min(_GEN_ROWS, rows - s), d_in), dtype=np.float32)
        store.append(x, x @ w.T + np.float32(0.01) * rng.standard_normal((x.shape[0], d_out), dtype=np.float32))
    return store


def _env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-P", "-c", script, *args], capture_output=True, text=True, env=_env())
    if out.returncode != 0:
        raise DataError(f"benchmark subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_command(args: Sequence[str]) -> dict:
    """Run ``prismoe ARGS`` in a fresh process, entered as the console script is (:func:`cli.main.run`); its
    stdout, wall seconds, CPU seconds and peak RSS (MiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        # -P: the cwd's checkout must not shadow this code
        proc = subprocess.Popen([sys.executable, "-P", "-c", "from cli.main import run; run()", *args],
                                stdout=out, stderr=err, text=True, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: its peak RSS)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise DataError(f"prismoe {' '.join(args[:1])} failed: {err.read().strip().splitlines()[-1:]}")
        return {"stdout": out.read(), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024}


def matmul_rate(m: int, n: int, k: int = _MATMUL_ROWS) -> tuple[float, float]:
    """This machine's float32 ``xᵀz`` rate for ``x [k, m]``, ``z [k, n]``: ``(FLOP/s, FLOP per CPU-second)``,
    best of three."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((k, m), dtype=np.float32)
    z = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    best, cpu = float("inf"), float("inf")
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        np.matmul(x.T, z, out=out)
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2.0 * k * m * n / best, 2.0 * k * m * n / cpu


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


def benchmark_fit(*, rows: Sequence[int] = (32768, 65536), d_in: int = 1024, d_out: int = 8192,
                  workers: int = 64, repeats: int = 1, precision: str = "mixed", memory_budget: int | None = None,
                  compressor: Compressor | None = None, lstsq: bool = False, workdir: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark (see the module docstring); returns the report as a dict.

    ``precision`` and ``memory_budget`` are the fit's (None: its default); ``compressor`` that of
    the pairs store (None: the pairs default).
    """
    rows = sorted({int(r) for r in rows})
    if not rows or rows[0] < 16:
        raise DataError(f"row counts must be at least 16, got {rows}")
    if repeats < 1:
        raise DataError(f"repeats must be at least 1, got {repeats}")
    say = log or (lambda s: None)
    tmp = workdir or tempfile.mkdtemp(prefix="prismoe-bench-fit-")
    os.makedirs(tmp, exist_ok=True)
    runs = []
    try:
        for r in rows:
            say(f"writing {r} synthetic pairs {d_in}→{d_out} ...")
            write_pairs(os.path.join(tmp, f"pairs-{r}"), r, d_in, d_out, compressor=compressor)
        k = min(d_out, 8192)
        for rep in range(repeats):
            for r in rows:
                say(f"fitting {r} rows (run {rep + 1} of {repeats}) in a fresh process ...")
                # a folder of its own per run, all removed at the end: on a file system that avoids reusing
                # the inodes of files deleted a minute ago (ext4 without a journal), removing the last
                # run's adapter right before made every file this run creates cost ~1 ms more
                adapter = os.path.join(tmp, f"adapter-{r}-run{rep + 1}")
                args = ["fit", os.path.join(tmp, f"pairs-{r}"), "-o", adapter, "--workers", str(workers),
                        "--precision", precision, "--overwrite", "--json", "--quiet"]
                if memory_budget:
                    args += ["--memory-mb", str(max(1, memory_budget >> 20))]
                os.sync()  # the pairs and the last run's adapter reach the disk now, not while this run is timed
                load = os.getloadavg()[0]
                before, cpu_before = matmul_rate(d_in, k)
                res = run_command(args)
                after, cpu_after = matmul_rate(d_in, k)
                info = json.loads(res["stdout"])
                t = info["timings"]
                stats_fl, all_fl = fit_flops(d_in, d_out, info["rows"])
                rate = max(before, after)
                rest = res["wall_s"] - t["statistics_s"] - t["solve_s"] - t["metrics_s"]
                runs.append({"rows": r, "repeat": rep, "fit_s": res["wall_s"], "cpu_s": res["cpu_s"],
                             "plan": info["plan"], "counts": info["rows"], "load": load, "matmul_gflops": rate / 1e9,
                             "matmul_gflops_before_after": [before / 1e9, after / 1e9],
                             "fit_gflops": all_fl / res["wall_s"] / 1e9,
                             "flop_ratio": all_fl / res["wall_s"] / rate,
                             "cpu_flop_ratio": all_fl / res["cpu_s"] / max(cpu_before, cpu_after),
                             "pass_ratio": stats_fl / t["statistics_s"] / rate,
                             "stages": {"pass": t["statistics_s"], "solve": t["solve_s"], "metrics": t["metrics_s"],
                                        "rest": rest},
                             "peak_rss_mb": res["peak_rss_mb"]})
        if lstsq:
            say("timing dask.array.linalg.lstsq on the largest pairs ...")
            lst = _run(_LSTSQ_SCRIPT, os.path.join(tmp, f"pairs-{rows[-1]}"))
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for r in rows:
                shutil.rmtree(os.path.join(tmp, f"pairs-{r}"), ignore_errors=True)
                for rep in range(repeats):
                    shutil.rmtree(os.path.join(tmp, f"adapter-{r}-run{rep + 1}"), ignore_errors=True)
    best = [max((x for x in runs if x["rows"] == r), key=lambda x: x["flop_ratio"]) for r in rows]
    peak = {r: max(x["peak_rss_mb"] for x in runs if x["rows"] == r) for r in rows}
    last = best[-1]
    report = {"d_in": d_in, "d_out": d_out, "rows": rows, "workers": workers, "repeats": repeats,
              "precision": precision, "cpus": usable_cpus(), "memory_budget_mb": (memory_budget or 0) / 2 ** 20,
              "compressor": compressor or PAIRS_OPTIONS.compressor, "runs": runs, "best": best,
              "flop_ratio": last["flop_ratio"], "pass_ratio": last["pass_ratio"],
              "cpu_flop_ratio": last["cpu_flop_ratio"], "rss_ratio": peak[rows[-1]] / peak[rows[0]]}
    if lstsq:
        report.update(lstsq_s=lst["lstsq_s"], lstsq_peak_rss_mb=lst["peak_rss_kb"] / 1024,
                      lstsq_time_ratio=last["fit_s"] / lst["lstsq_s"])
    return report


def format_report(r: dict) -> str:
    """The report as a few readable lines."""
    budget = f"{r['memory_budget_mb']:.0f} MiB" if r["memory_budget_mb"] else "default"
    lines = [f"fit benchmark: prismoe fit, whole process, {r['d_in']}→{r['d_out']}, {r.get('workers', '?')} workers "
             f"per pipe, precision {r.get('precision', '?')}, rows {r['rows']}, {r['cpus']} CPUs, memory budget "
             f"{budget}, pairs compressor {r.get('compressor', '?')}; load: the 1-minute load average before "
             "each run (the benchmark's own earlier runs count in it)"]
    for run in r["runs"]:
        st = run["stages"]
        lines.append(f"  {run['rows']:>9d} rows: {run['fit_s']:6.2f} s "
                     f"(pass {st['pass']:.2f}, solve {st['solve']:.2f}, "
                     f"metrics {st['metrics']:.2f}, rest {st['rest']:.2f}), flop ratio {run['flop_ratio']:.2f} "
                     f"(pass {run['pass_ratio']:.2f}, per CPU-s {run['cpu_flop_ratio']:.2f}) of "
                     f"{run['matmul_gflops']:.0f} GFLOP/s float32 matmul, peak RSS {run['peak_rss_mb']:.0f} MiB, "
                     f"load {run['load']:.1f}")
    best = ", ".join(f"{b['rows']}: {b['flop_ratio']:.2f}" for b in r["best"])
    lines.append(f"  best flop ratio per row count: {best} (target ≥ 0.5, goal 0.8); per CPU-second (largest) "
                 f"{r['cpu_flop_ratio']:.2f}")
    if "lstsq_time_ratio" in r:
        lines.append(f"  time vs dask.array.linalg.lstsq: {r['lstsq_time_ratio']:.2f}× "
                     f"({r['lstsq_s']:.2f} s for lstsq)")
    lines.append(f"  peak RSS largest/smallest rows: {r['rss_ratio']:.3f} (flat: ≤ 1.10)")
    return "\n".join(lines)
