"""Gate-training settings and defaults, kept free of torch so the CLI can show them cheaply.

>>> GateSettings(epochs=3).epochs
3
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields

from prismoe_store.errors import DataError

DEFAULT_MAX_TILE_BYTES = 1 << 30  # tiles held in memory for training/statistics (all pipes)
SPARSITIES = (0.1, 0.3, 0.5, 1.0)  # the quality report's sparsities
INITS = ("gain", "energy", "zero")  # gate initialisations (see docs/gates.md)


# -- validation of single fields ----------------------------------------------------------------


def parse_fraction(name: str, value, *, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a share in ``(0, 1]`` (the ends open or closed as asked); else :class:`DataError`.

    >>> parse_fraction("sparsity", 1), parse_fraction("holdout", 0.1, high_open=True)
    (1.0, 0.1)
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        span = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise DataError(f"{name} must be in {span}, got {value!r}")
    return float(value)


def parse_positive(name: str, value, *, zero: bool = False) -> float:
    """``value`` as a finite number ``> 0`` (``>= 0`` with ``zero``); else :class:`DataError`.

    >>> parse_positive("lr", 0.01), parse_positive("z_loss_coef", 0, zero=True)
    (0.01, 0.0)
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if zero else value > 0)):
        raise DataError(f"{name} must be a {'non-negative' if zero else 'positive'} number, got {value!r}")
    return float(value)


def parse_count(name: str, value, *, minimum: int = 0) -> int:
    """``value`` as an integer ``>= minimum`` (not a bool); else :class:`DataError`.

    >>> parse_count("epochs", 0), parse_count("batch_size", 8, minimum=1)
    (0, 8)
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive" if minimum == 1 else f">= {minimum}"
        raise DataError(f"{name} must be a {kind} integer, got {value!r}")
    return value


def parse_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``; else :class:`DataError`.

    >>> parse_choice("init", "gain", INITS)
    'gain'
    """
    if value not in choices:
        raise DataError(f"{name} must be one of {choices}, got {value!r}")
    return value


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSettings:
    """Gate-training settings: the config of :func:`prismoe_store.gates.training.fit_gates` (stored,
    with the split resolved, in the adapter's ``gates`` attribute). Validated on construction
    (:class:`~prismoe_store.errors.DataError`).

    >>> GateSettings(sparsity=0.5).k(16)
    8
    >>> GateSettings(lr=0)
    Traceback (most recent call last):
    ...
    prismoe_store.errors.DataError: lr must be a positive number, got 0
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
    patience: int = 5  # epochs without held-out improvement before early stopping (0: never stop early)
    holdout: float | None = None  # share of rows held out; None: the adapter fit's split (else 0.1)
    seed: int | None = None  # seed of the held-out split, the init sample and the minibatch order; None: the fit's

    def __post_init__(self) -> None:
        parse_fraction("sparsity", self.sparsity)
        for name in ("temperature", "lr", "init_scale"):
            parse_positive(name, getattr(self, name))
        for name in ("balance_coef", "z_loss_coef"):
            parse_positive(name, getattr(self, name), zero=True)
        for name in ("epochs", "patience"):
            parse_count(name, getattr(self, name))
        for name in ("batch_size", "init_rows"):
            parse_count(name, getattr(self, name), minimum=1)
        parse_choice("init", self.init, INITS)
        if self.holdout is not None and not (isinstance(self.holdout, (int, float)) and 0.0 < self.holdout < 1.0):
            raise DataError(f"holdout must be in (0, 1): gates stop early on held-out rows, got {self.holdout}")
        if self.seed is not None:
            parse_count("seed", self.seed)

    def k(self, n_active: int) -> int:
        """``K`` for a pipe with ``n_active`` non-padding workers."""
        from prismoe_store.gates.routing import k_for

        return k_for(self.sparsity, n_active)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the saved one (all but epochs and patience)."""
        return {k: v for k, v in asdict(self).items() if k not in ("epochs", "patience")}


@dataclass(frozen=True)
class BandGateDefaults:
    """The defaults of a head adapter's band gate (:class:`~prismoe_store.head.band_gate.BandGateConfig`
    takes them from :data:`BAND_GATE`), kept here, free of torch, so ``prismoe fit-gates --help`` can
    show them beside :class:`GateSettings`'.

    >>> BAND_GATE.sparsity < GateSettings.sparsity
    True
    """

    sparsity: float = 0.1  # ρ: share of bands a token takes
    epochs: int = 10  # most passes over the training rows
    lr: float = 2e-3  # Adam learning rate
    batch_size: int = 256  # rows per optimizer step
    holdout: float = 0.05  # share of rows held out to choose the best epoch
    seed: int = 0  # the held-out split and the shuffling


BAND_GATE = BandGateDefaults()


def reused_settings(saved: Mapping, left_out: Iterable[str], *, head: bool = False) -> dict:
    """Of the settings ``left_out`` (options not given on the command line), the values the saved run
    recorded (``saved``: the adapter's ``gates`` settings, :meth:`AdapterStore.gate_settings`): a
    re-run, ``--restart`` included, keeps them, so only what is given changes. ``head``: the settings
    of a head adapter's band gate (:data:`BAND_GATE`'s names), else :class:`GateSettings`'.

    >>> reused_settings({"sparsity": 0.2, "lr": 0.005, "kind": "band-mass"}, ["sparsity", "epochs"], head=True)
    {'sparsity': 0.2}
    """
    names = {f.name for f in fields(BandGateDefaults if head else GateSettings)}
    return {k: saved[k] for k in left_out if k in names and saved.get(k) is not None}
