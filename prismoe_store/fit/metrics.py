"""The fit's held-out metrics (DESIGN.md §4): relative error and R² of each pipe and their blend.

During the statistics pass (:mod:`prismoe_store.fit.statistics`) each task copies its held-out rows into
the adapter's ``_fit`` scratch (a tenth of the data, one chunk per row block); after the solves
:func:`prismoe_store.fit.job.fit` streams them once through :func:`metrics_link` to compute, per pipe
and for ``y = Σ α_p y_p``, the relative error ``‖y − z‖/‖z‖`` and
``R² = 1 − ‖y − z‖² / ‖z − z̄‖²`` (``z̄``: per-output mean of the held-out rows), stored in the
adapter's ``metrics`` attribute (the example in :mod:`prismoe_store.fit.job` checks one).

>>> import numpy as np
>>> s = Scores(3, 2)
>>> s.add_z(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))  # returns the block's Σ‖z‖²
30.0
>>> s.rows, s.mean.tolist(), s.m2.tolist()
(2, [2.0, 3.0], [2.0, 2.0])
"""

from __future__ import annotations

import math

import numpy as np

from prismoe_store.fit.plan import PANEL, col_groups
from prismoe_store.fit.runner import one_blas_thread
from prismoe_store.fit.statistics import SCRATCH, Pass
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.chunk_files import region_reader
from prismoe_store.stores.verified import reading


class Scores:
    """One stripe's held-out sums for one column group (all float64)."""

    def __init__(self, n_pipes: int, ncols: int):
        self.rows = 0  # held-out rows seen
        self.sse = np.zeros(n_pipes + 1)  # Σ‖y_p − z‖² per pipe, then the α-combination (set by finish)
        self.sz2 = 0.0  # Σ‖z‖² (set by finish)
        self.parts: list[np.ndarray] = []  # per block: its sse per pipe, the combination's, its Σ‖z‖²
        self.mean = np.zeros(ncols)  # per-output mean of z (Chan's parallel update)
        self.m2 = np.zeros(ncols)  # per-output Σ(z − mean)²

    def add_z(self, z: np.ndarray, work: np.ndarray | None = None) -> float:
        """Merge a block's per-output moments; returns its Σ‖z‖². ``work``: a float64 array of
        ``z``'s shape to use (and overwrite) instead of a fresh one."""
        n = z.shape[0]
        if work is None:
            zd = z.astype(np.float64)
        else:
            zd = work
            zd[...] = z
        sz2 = float(np.einsum("ij,ij->", zd, zd))
        mean = zd.mean(0)
        zd -= mean
        self._merge_moments(n, mean, np.einsum("ij,ij->j", zd, zd))
        return sz2

    def finish(self) -> Scores:
        """Sum the blocks' parts exactly (``math.fsum``), so the totals do not depend on the stripes."""
        if self.parts:
            cols = np.array(self.parts).T
            self.sse = np.array([math.fsum(c) for c in cols[:-1]])
            self.sz2 = math.fsum(cols[-1])
        return self

    def _merge_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        tot = self.rows + n
        if n == 0:
            return
        delta = mean - self.mean
        self.mean += delta * (n / tot)
        self.m2 += m2 + delta ** 2 * (self.rows * n / tot)
        self.rows = tot

    def merge(self, other: Scores) -> Scores:
        self.parts += other.parts
        self._merge_moments(other.rows, other.mean, other.m2)
        return self


def _predict(x: np.ndarray, w: np.ndarray, y: np.ndarray, j0: int, j1: int) -> None:
    """``y[:, j0:j1] = x @ w[j0:j1].T`` (one GEMM on the calling thread's single BLAS thread)."""
    y[:, j0:j1] = np.matmul(x, w[j0:j1].T)


def metrics_link(p: Pass, counts: np.ndarray, c0: int, c1: int, b0: int, b1: int, acc: Scores | None) -> Scores:
    """Held-out predictions of every pipe and their α-combination for blocks ``b0:b1``. A pipe
    whose tiles are another's (``p.sources``) reuses that pipe's predictions."""
    adapter = AdapterStore.open(p.adapter_url, storage_options=p.adapter_options)
    hx, hz = adapter.group[f"{SCRATCH}/hold_x"], adapter.group[f"{SCRATCH}/hold_z"]
    rx, rz = region_reader(hx), region_reader(hz)
    acc = acc if acc is not None else Scores(len(p.sources), c1 - c0)
    distinct = sorted(set(p.sources))
    with reading(f"tiles of {p.adapter_url}"):
        ws = {q: adapter.tiles(q)[c0:c1, : p.d_in] for q in distinct}  # [cols, M] each
    for q in distinct:
        if p.scales[q] != 1.0:
            ws[q] *= np.float32(p.scales[q])
    bufs: dict[str, np.ndarray] = {}  # work arrays reused across blocks (fresh memory is slow to touch)

    def buf(name: str, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
        if name not in bufs:
            bufs[name] = np.empty((int(counts[b0:b1].max(initial=0)), shape[1]), dtype)
        return bufs[name][:shape[0]]

    for b in range(b0, b1):
        n = int(counts[b])
        if n == 0:
            continue
        with reading(f"held-out rows in {p.adapter_url}"):
            x = rx.read(slice(0, n), slice(None), buf("x", (n, p.d_in)), lead=(b,))
            z = rz.read(slice(0, n), slice(c0, c1), buf("z", (n, c1 - c0)), lead=(b,))
        ys = {q: buf(f"y{q}", z.shape) for q in distinct}
        with one_blas_thread() as pool:  # one product per panel of outputs, spread over the cores
            jobs = [pool.submit(_predict, x, ws[q], ys[q], j0, j1) for q in distinct
                    for j0, j1 in col_groups(c1 - c0, PANEL)]
            for job in jobs:
                job.result()
        comb, term = buf("comb", z.shape), buf("term", z.shape)
        comb[...] = 0
        for q, src in enumerate(p.sources):
            comb += np.multiply(np.float32(p.alphas[q]), ys[src], out=term)
        part = np.zeros(len(p.sources) + 2)
        for q in distinct:
            ys[q] -= z
            sse = float(np.einsum("ij,ij->", ys[q], ys[q], dtype=np.float64))
            part[[i for i, src in enumerate(p.sources) if src == q]] = sse
        comb -= z
        part[-2] = float(np.einsum("ij,ij->", comb, comb, dtype=np.float64))
        part[-1] = acc.add_z(z, buf("z64", z.shape, np.float64))
        acc.parts.append(part)
    return acc

