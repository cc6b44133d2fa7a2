"""Gate-training settings and defaults, kept free of torch so the CLI can show them cheaply.

>>> GateSettings(epochs=3).epochs
3
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from prismoe_store.errors import DataError

DEFAULT_MAX_TILE_BYTES = 1 << 30  # tiles held in memory for training/statistics (all pipes)
SPARSITIES = (0.1, 0.3, 0.5, 1.0)  # the quality report's sparsities
INITS = ("gain", "energy", "zero")  # gate initialisations (see docs/gates.md)


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSettings:
    """Gate-training settings (stored in the adapter's ``gates`` attribute).

    >>> GateSettings(sparsity=0.5).k(16)
    8
    """

    sparsity: float = 0.3  # ρ: share of the active workers each token uses (K = round(ρ·n))
    temperature: float = 1.0  # softmax temperature of the selected scores (training and runtime)
    epochs: int = 30  # maximum passes over the training rows
    lr: float = 1e-2  # Adam learning rate (the gate lives in standardized-input units)
    batch_size: int = 256  # rows per minibatch
    balance_coef: float = 1e-2  # weight of the load-balancing loss W·Σ f_i P_i / K
    z_loss_coef: float = 0.0  # weight of the router z-loss (mean squared log-sum-exp)
    init: str = "gain"  # gate initialisation: "gain" or "energy" (regressions of per-tile quantities), "zero"
    init_rows: int = 4096  # training rows sampled for the init, the input scaling and the loss scale
    init_scale: float = 0.01  # standard deviation of the initial scores: small, so the weights start ≈ 1
    patience: int = 5  # epochs without held-out improvement before early stopping
    holdout: float = 0.1  # share of rows held out (the fit's seeded split)
    seed: int = 0  # seed of the held-out split, the init sample and the minibatch order

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and 0.0 < self.sparsity <= 1.0):
            raise DataError(f"sparsity must be in (0, 1], got {self.sparsity!r}")
        for name in ("temperature", "lr", "init_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise DataError(f"{name} must be a positive number, got {v!r}")
        for name in ("balance_coef", "z_loss_coef"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise DataError(f"{name} must be a non-negative number, got {v!r}")
        for name in ("epochs", "patience", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise DataError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("batch_size", "init_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if self.init not in INITS:
            raise DataError(f"init must be one of {INITS}, got {self.init!r}")
        if not 0.0 < self.holdout < 1.0:
            raise DataError(f"holdout must be in (0, 1): gates stop early on held-out rows, got {self.holdout}")

    def k(self, n_active: int) -> int:
        """``K`` for a pipe with ``n_active`` non-padding workers."""
        from prismoe_store.gates.routing import k_for

        return k_for(self.sparsity, n_active)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the saved one (all but epochs and patience)."""
        return {k: v for k, v in asdict(self).items() if k not in ("epochs", "patience")}
