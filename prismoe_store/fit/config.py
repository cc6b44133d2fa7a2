"""The fit's settings: :class:`FitConfig`, the one way into :func:`prismoe_store.fit.fit`.

>>> FitConfig(mode="independent", holdout=0.2).subsample
0.6
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from prismoe_store.errors import DataError, GridError
from prismoe_store.grid import GridSpec, is_pow2
from prismoe_store.stores.adapter import MODES

SOLVERS = ("cholesky", "qr")  # normal equations, or streaming TSQR for ill-conditioned X
PRECISIONS = ("mixed", "float64", "float32")  # the products of each block (see fit.statistics "Numerics")
SCHEDULERS = ("threads", "processes", "synchronous")  # local Dask schedulers (or a tcp:// address)
SUBSAMPLE_SEED_OFFSET = 1 << 32  # pipe 2's subsample uses row_uniform(seed + this)


@dataclass(frozen=True)
class FitConfig:
    """Settings of a fit; the first group changes the result, the second only speed and memory.

    >>> FitConfig(mode="independent", holdout=0.2).subsample
    0.6
    """

    mode: str = "joint"  # "joint" (band-wise ridge over the whole input) or "independent" (per-tile ridge)
    workers: int = 512  # tiles per pipe, a power of 2 (the grids come from plan_pipes)
    grids: tuple[GridSpec, ...] | None = None  # the three pipes' grids; None: plan_pipes(d_in, d_out, workers)
    ridge: float | None = None  # λ ≥ 0; None: 1e-6·trace(G)/M for each statistics set
    holdout: float = 0.1  # share of rows held out for the metrics, in [0, 1)
    subsample: float = 0.6  # share of training rows pipe 2 fits on, in (0, 1]
    seed: int = 0  # seeds the held-out split and pipe 2's subsample
    alphas: tuple[float, ...] | None = None  # pipe weights α (non-negative, sum 1); None: equal
    solver: str = "cholesky"  # "cholesky" (normal equations) or "qr" (streaming TSQR, ill-conditioned X)
    precision: str = "mixed"  # products of each block: "mixed" (G float64, B float32), "float64" or
    #   "float32" (all); always summed across blocks in float64 (see fit.statistics "Numerics")
    # -- speed and memory only --
    memory_budget: int | None = None  # bytes for accumulators and row blocks; None: 1/4 of physical RAM
    block_rows: int | None = None  # rows per product block; None: 4096 rounded up to the store's row chunks
    tasks: int | None = None  # row stripes accumulated in parallel; None: cores/2 (≤ 4) locally, a cluster's threads
    keep_statistics: bool = False  # keep the ``_fit`` scratch (G, B, held-out rows) after the fit

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not is_pow2(self.workers):
            raise GridError(f"workers must be a power of 2, got {self.workers!r}")
        if self.grids is not None:
            grids = tuple(self.grids)
            if len(grids) != 3 or not all(isinstance(g, GridSpec) for g in grids):
                raise GridError("grids must be three GridSpec, one per pipe")
            object.__setattr__(self, "grids", grids)
        if self.ridge is not None and not (np.isfinite(self.ridge) and self.ridge >= 0):
            raise DataError(f"ridge must be a finite number ≥ 0, got {self.ridge!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise DataError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if not 0.0 < self.subsample <= 1.0:
            raise DataError(f"subsample must be in (0, 1], got {self.subsample!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SUBSAMPLE_SEED_OFFSET:
            raise DataError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.alphas is not None:
            alphas = tuple(float(a) for a in self.alphas)
            if len(alphas) != 3 or any(not np.isfinite(a) or a < 0 for a in alphas) or abs(sum(alphas) - 1) > 1e-6:
                raise DataError(f"alphas must be 3 non-negative numbers summing to 1, got {list(alphas)}")
            object.__setattr__(self, "alphas", alphas)
        if self.solver not in SOLVERS:
            raise DataError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.precision not in PRECISIONS:
            raise DataError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("memory_budget", "block_rows", "tasks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DataError(f"{name} must be a positive integer, got {v!r}")

    def settings(self, grids: Sequence[GridSpec]) -> dict:
        """The result-affecting settings as plain data (stored in the adapter; compared on resume)."""
        d = {k: v for k, v in asdict(self).items()
             if k not in ("memory_budget", "block_rows", "tasks", "keep_statistics", "grids", "workers")}
        d["grids"] = [g.to_dict() for g in grids]
        d["alphas"] = list(self.alphas) if self.alphas is not None else None
        return d
