"""The fit's held-out metrics (DESIGN.md §4): relative error and R² of each pipe and their blend.

During the statistics pass (:mod:`prismoe_store.fit.statistics`) each task copies its held-out rows into
the adapter's ``_fit`` scratch (a tenth of the data, one chunk per row block); after the solves
:func:`prismoe_store.fit.job.fit` streams them once through :func:`metrics_link` to compute, per pipe
and for ``y = Σ α_p y_p``, the relative error ``‖y − z‖/‖z‖`` and
``R² = 1 − ‖y − z‖² / ‖z − z̄‖²`` (``z̄``: per-output mean of the held-out rows), stored in the
adapter's ``metrics`` attribute (the example in :mod:`prismoe_store.fit.job` checks one).

>>> import numpy as np
>>> sz2, mean, m2 = block_moments(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))  # a block's Σ‖z‖² and moments
>>> s = Scores(3, 2)
>>> s.merge_moments(2, mean, m2)
>>> sz2, s.rows, s.mean.tolist(), s.m2.tolist()
(30.0, 2, [2.0, 3.0], [2.0, 2.0])
"""

from __future__ import annotations

import math

import numpy as np

from prismoe_store.fit.plan import PANEL, Plan, col_groups
from prismoe_store.fit.runner import Runner, one_blas_thread, thread_buffer
from prismoe_store.fit.statistics import SCRATCH, Pass
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.chunk_files import region_reader
from prismoe_store.stores.verified import reading

SOLVED: dict[str, dict[int, np.ndarray]] = {}  # in-process fits: each distinct pipe's tiles [d_out, M], by run id


class Scores:
    """One stripe's held-out sums for one column group (all float64)."""

    def __init__(self, n_pipes: int, ncols: int):
        self.rows = 0  # held-out rows seen
        self.sse = np.zeros(n_pipes + 1)  # Σ‖y_p − z‖² per pipe, then the α-combination (set by finish)
        self.sz2 = 0.0  # Σ‖z‖² (set by finish)
        self.parts: list[np.ndarray] = []  # per block: its sse per pipe, the combination's, its Σ‖z‖²
        self.mean = np.zeros(ncols)  # per-output mean of z (Chan's parallel update)
        self.m2 = np.zeros(ncols)  # per-output Σ(z − mean)²

    def finish(self) -> Scores:
        """Sum the blocks' parts exactly (``math.fsum``), so the totals do not depend on the stripes."""
        if self.parts:
            cols = np.array(self.parts).T
            self.sse = np.array([math.fsum(c) for c in cols[:-1]])
            self.sz2 = math.fsum(cols[-1])
        return self

    def merge_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge ``n`` rows' per-output mean and Σ(z − mean)² (Chan's parallel update)."""
        tot = self.rows + n
        if n == 0:
            return
        delta = mean - self.mean
        self.mean += delta * (n / tot)
        self.m2 += m2 + delta ** 2 * (self.rows * n / tot)
        self.rows = tot

    def merge(self, other: Scores) -> Scores:
        self.parts += other.parts
        self.merge_moments(other.rows, other.mean, other.m2)
        return self


def block_moments(z: np.ndarray, work: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """``(Σ‖z‖², per-output mean, per-output Σ(z − mean)²)`` of rows ``z [n, cols]``, in float64
    (``work``: a float64 array of ``z``'s shape to overwrite instead of a fresh one)."""
    if work is None:
        zd = z.astype(np.float64)
    else:
        zd = work
        zd[...] = z
    sz2 = float(np.einsum("ij,ij->", zd, zd))
    mean = zd.mean(0)
    zd -= mean
    return sz2, mean, np.einsum("ij,ij->j", zd, zd)


def _panel_scores(p: Pass, x: np.ndarray, ws: dict[int, np.ndarray], z: np.ndarray, j0: int, j1: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out sums of outputs ``j0:j1`` of one block, on the calling thread's single BLAS
    thread: ``(part, mean, m2)`` with ``part`` = [Σ‖y_p − z‖² per pipe, the α-combination's, Σ‖z‖²]
    and the outputs' moments. All of a panel's work is done here, so it stays in cache and the
    panels of a block spread over the cores."""
    n, cols = z.shape[0], j1 - j0
    zp = z[:, j0:j1]  # [n, cols]
    distinct = sorted(ws)
    ys = {q: np.matmul(x, ws[q][j0:j1].T, out=thread_buffer(f"y{q}", (n, cols), np.float32)) for q in distinct}
    comb, term = thread_buffer("comb", (n, cols), np.float32), thread_buffer("term", (n, cols), np.float32)
    comb[...] = 0
    for q, src in enumerate(p.sources):  # y = Σ α_p y_p, in pipe order
        comb += np.multiply(np.float32(p.alphas[q]), ys[src], out=term)
    part = np.zeros(len(p.sources) + 2)
    for q in distinct:
        ys[q] -= zp
        part[[i for i, src in enumerate(p.sources) if src == q]] = np.einsum("ij,ij->", ys[q], ys[q], dtype=np.float64)
    comb -= zp
    part[-2] = np.einsum("ij,ij->", comb, comb, dtype=np.float64)
    part[-1], mean, m2 = block_moments(zp, thread_buffer("z64", (n, cols), np.float64))
    return part, mean, m2


def metrics_link(p: Pass, counts: np.ndarray, c0: int, c1: int, b0: int, b1: int, acc: Scores | None) -> Scores:
    """Held-out predictions of every pipe and their α-combination for blocks ``b0:b1``. A pipe
    whose tiles are another's (``p.sources``) reuses that pipe's predictions."""
    adapter = AdapterStore.open(p.adapter_url, storage_options=p.adapter_options)
    hx, hz = adapter.group[f"{SCRATCH}/hold_x"], adapter.group[f"{SCRATCH}/hold_z"]
    rx, rz = region_reader(hx), region_reader(hz)
    acc = acc if acc is not None else Scores(len(p.sources), c1 - c0)
    solved = SOLVED.get(p.run_id) if p.run_id else None  # the tiles just solved (being written meanwhile)
    if solved is not None:
        ws = {q: solved[q][c0:c1] * np.float32(p.scales[q]) if p.scales[q] != 1.0 else solved[q][c0:c1]
              for q in sorted(set(p.sources))}
    else:
        with reading(f"tiles of {p.adapter_url}"):
            ws = {q: adapter.tiles(q)[c0:c1, : p.d_in] for q in sorted(set(p.sources))}  # [cols, M] each
        for q in ws:
            if p.scales[q] != 1.0:
                ws[q] *= np.float32(p.scales[q])
    rows = int(counts[b0:b1].max(initial=0))
    xbuf, zbuf = np.empty((rows, p.d_in), np.float32), np.empty((rows, c1 - c0), np.float32)  # reused across blocks
    mean, m2 = np.empty(c1 - c0), np.empty(c1 - c0)
    for b in range(b0, b1):
        n = int(counts[b])
        if n == 0:
            continue
        with reading(f"held-out rows in {p.adapter_url}"):
            x = rx.read(slice(0, n), slice(None), xbuf[:n], lead=(b,))
            z = rz.read(slice(0, n), slice(c0, c1), zbuf[:n], lead=(b,))
        with one_blas_thread() as pool:  # one job per panel of outputs, spread over the cores
            panels = col_groups(c1 - c0, PANEL)
            jobs = [pool.submit(_panel_scores, p, x, ws, z, j0, j1) for j0, j1 in panels]
            for (j0, j1), job in zip(panels, jobs):
                part, mean[j0:j1], m2[j0:j1] = job.result()
                acc.parts.append(part)
        acc.merge_moments(n, mean, m2)
    return acc


def heldout_metrics(p: Pass, plan: Plan, runner: Runner, per_block: np.ndarray, n: int, warnings) -> dict:
    """The adapter's ``metrics`` record: :func:`metrics_link` over every stripe and output column
    group of ``plan`` (``n`` outputs), the stripes' sums merged, relative errors and R² per pipe and
    for the α-combination."""
    total = None
    for gi, (c0, c1) in enumerate(col_groups(n, plan.metric_cols)):
        # one task per stripe: each loads its rows of the three pipes' tiles once
        chains = [[(b1 - b0, metrics_link, p, per_block, c0, c1, b0, b1)] for b0, b1 in plan.stripes()]
        results = runner.run(chains, f"fit-metrics-g{gi}")
        acc = results[0]
        for other in results[1:]:
            acc.merge(other)
        acc.finish()
        if total is None:
            total = acc
        else:  # column groups are disjoint: sums add, row count is the same
            total.sse += acc.sse
            total.sz2 += acc.sz2
            total.m2 = np.concatenate([total.m2, acc.m2])
    assert total is not None, "a fit has at least one column group"
    sst, sz2 = float(total.m2.sum()), total.sz2

    def score(sse: float) -> dict:
        return {"rel_err": math.sqrt(sse / sz2) if sz2 > 0 else float("nan"),
                "r2": 1.0 - sse / sst if sst > 0 else float("nan")}

    return {"holdout_rows": int(total.rows), "pipes": [score(float(s)) for s in total.sse[:-1]],
            "combined": score(float(total.sse[-1])), "warnings": list(warnings)}
