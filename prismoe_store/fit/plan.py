"""The fit's plan: how it cuts its rows into blocks and stripes and its output columns into groups.

The plan is stored in the adapter on the first run and reused on resume, so a resumed fit adds the
same blocks in the same order (a bit-identical adapter).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from prismoe_store.errors import FitError
from prismoe_store.fit.config import FitConfig
from prismoe_store.stores.pairs import PairsStore

DEFAULT_BLOCK_ROWS = 4096  # rows per product block: long GEMMs, yet few block buffers (fresh memory is slow to touch)


@dataclass(frozen=True)
class Plan:
    """How a fit cuts its rows into blocks and stripes and its output columns into groups (stored, reused on resume)."""

    rows: int  # S: rows the fit reads (the store's committed rows when it started)
    block_rows: int  # rows per product block (a multiple of the store's row chunk)
    tasks: int  # row stripes (parallel accumulators)
    group_cols: int  # output columns per statistics group
    metric_cols: int  # output columns per metrics group
    hold_cap: int  # most held-out rows in one block (the held-out scratch's chunk height)

    @property
    def blocks(self) -> int:
        """Row blocks in all."""
        return -(-self.rows // self.block_rows)

    def stripes(self) -> list[tuple[int, int]]:
        """Block ranges ``[b0, b1)`` of the stripes (empty stripes dropped)."""
        nb, t = self.blocks, min(self.tasks, self.blocks)
        edges = [nb * i // t for i in range(t + 1)]
        return [(edges[i], edges[i + 1]) for i in range(t) if edges[i + 1] > edges[i]]


def location(url) -> str:
    """A store URL as tasks anywhere can open it: local paths made absolute.

    >>> location("memory://x"), location("/data/p")
    ('memory://x', '/data/p')
    """
    url = str(url)
    return url if "://" in url else os.path.abspath(url)


def col_groups(n: int, width: int) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` of ``n`` columns cut into groups of ``width``."""
    return [(c, min(n, c + width)) for c in range(0, n, width)]


def input_slices(m: int, width: int) -> list[tuple[int, int]]:
    """Real input columns of each slice of ``width`` (``0``: the whole input)."""
    return [(0, m)] if width == 0 else [(c, min(m, c + width)) for c in range(0, m, width)]


def _budget_cols(budget: int, tasks: int, fixed: int, per_col: int, n: int, align: int, what: str) -> int:
    cols = (budget // tasks - fixed) // per_col
    if cols < 1:
        need = tasks * (fixed + per_col)
        raise FitError(f"memory budget of {budget / 2**20:.2f} MiB is too small for {what} "
                       f"(needs at least {need / 2**20:.2f} MiB with {tasks} tasks): raise it or lower --tasks")
    if cols >= n:
        return n
    return cols // align * align if cols >= align else cols


def plan_block_rows(cfg: FitConfig, pairs: PairsStore, rows: int) -> int:
    """Rows per product block: ``cfg.block_rows``, else 4096 rounded up to the store's row chunks."""
    rc = pairs.rows_per_chunk
    block = cfg.block_rows or max(rc, -(-DEFAULT_BLOCK_ROWS // rc) * rc)
    return min(block, max(1, rows))


def make_plan(cfg: FitConfig, pairs: PairsStore, rows: int, block: int, tasks: int, hold_cap: int,
              n_slicings: int) -> Plan:
    """The plan that fits ``cfg.memory_budget``: fewer stripes first, then narrower column groups."""
    m, n = pairs.d_in, pairs.d_out
    budget = cfg.memory_budget or _default_budget()
    align = int(pairs.z.chunks[1])
    f64 = 8 if cfg.precision == "float64" else 0  # float64 copies of a block's z
    x64 = 0 if cfg.precision == "float32" else 8  # float64 copies of a block's x
    if cfg.precision != "float64" and n > PANEL:
        align = math.lcm(align, PANEL)  # groups of whole panels: no panel is computed twice
    if cfg.solver == "cholesky":
        # per task: 2 row sets of B (float64) and a float32 product; block buffers: two (the block in
        # use and the one prefetched, each read into in its grouped order), plus float64 copies
        per_col = 20 * m + (8 + f64) * block
        fixed = 20 * m * m + (8 + x64) * block * m
    else:
        # per task and slicing: 2 row sets of R and QᵀZ; Q of a (m+block)×m QR; stacked [QᵀZ; z]
        per_col = n_slicings * 16 * m + 16 * (m + block) + 12 * block
        fixed = n_slicings * 16 * m * m + 16 * (m + block) * m + 12 * block * m
    tasks = max(1, min(tasks, -(-rows // block)))
    while tasks > 1 and tasks * (fixed + per_col * min(n, align)) > budget:
        tasks -= 1  # fewer stripes before narrower groups: each stripe holds a whole G
    group = _budget_cols(budget, tasks, fixed, per_col, n, align, "the statistics G and one column group of B")
    cap = max(1, hold_cap)
    # metrics: the three pipes' rows of W (float32), predictions, held-out z and column stats
    per_col_m = 12 * m + 6 * 4 * cap + 24
    fixed_m = 8 * cap * m
    metric = _budget_cols(budget, tasks, fixed_m, per_col_m, n, align, "the held-out metrics")
    return Plan(rows=rows, block_rows=block, tasks=tasks, group_cols=group, metric_cols=metric, hold_cap=cap)


def _default_budget() -> int:
    import psutil

    return max(256 << 20, psutil.virtual_memory().total // 4)

PANEL = 512  # float32 products of B: output columns per GEMM, at fixed absolute columns (see "Numerics")
