"""Typed records of what stores hold in their attributes: a fit, its metrics, gates, a stored tensor.

Each record is a frozen dataclass validated on construction by small ``parse_*`` helpers (a bad
value raises :class:`~prismoe_store.errors.StoreError` naming the field), with ``to_dict`` (the
JSON-able form written to the store, the layout of ``docs/store-format.md``) and ``from_dict``
(reading it back; stores written by earlier versions read the same). Fields a job writes later
(a fit's ridge, counts and timings) are ``None`` until written and left out of ``to_dict``.

>>> r = FitRecord(settings={"mode": "joint", "holdout": 0.1, "seed": 0})
>>> r.holdout, r.seed, FitRecord.from_dict(r.to_dict()) == r
(0.1, 0, True)
>>> FitRecord(settings={}, counts={"train": -1})
Traceback (most recent call last):
...
prismoe_store.errors.StoreError: fit record: counts['train'] must be an integer ≥ 0, got -1
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prismoe_store.errors import PrismoeError, StoreError
from prismoe_store.grid import GridSpec
from prismoe_store.sources.records import SourceStamp, parse_stamp

# -- parse helpers: each returns the value in its stored type, or raises StoreError -------------


def parse_mapping(value: Any, what: str) -> dict:
    """A JSON object (string keys), deep-copied so a record never shares state with the store.

    >>> parse_mapping({"a": [1]}, "x")
    {'a': [1]}
    """
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise StoreError(f"{what} must be a mapping with string keys, got {value!r}")
    return copy.deepcopy(dict(value))


def parse_count(value: Any, what: str) -> int:
    """An integer ≥ 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise StoreError(f"{what} must be an integer ≥ 0, got {value!r}")
    return int(value)


def parse_number(value: Any, what: str, *, finite: bool = False, minimum: float | None = None) -> float:
    """A real number (NaN allowed unless ``finite``: a score of an empty hold-out is NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise StoreError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise StoreError(f"{what} must be finite, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise StoreError(f"{what} must be ≥ {minimum}, got {value!r}")
    return value


def parse_flag(value: Any, what: str) -> bool:
    """``True`` or ``False`` exactly."""
    if not isinstance(value, bool):
        raise StoreError(f"{what} must be true or false, got {value!r}")
    return value


def parse_text(value: Any, what: str) -> str:
    """A string."""
    if not isinstance(value, str):
        raise StoreError(f"{what} must be a string, got {value!r}")
    return value


def parse_texts(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings, as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise StoreError(f"{what} must be a list of strings, got {value!r}")
    return tuple(parse_text(v, f"{what}[{i}]") for i, v in enumerate(value))


def parse_table(value: Any, what: str, parse_value) -> dict[str, Any]:
    """A mapping from names to values, each checked by ``parse_value(value, what)``."""
    table = parse_mapping(value, what)
    return {k: parse_value(v, f"{what}[{k!r}]") for k, v in table.items()}


def _optional(value: Any, parse, *args, **kwargs):
    return None if value is None else parse(value, *args, **kwargs)


def _seconds(value: Any, what: str) -> float:
    return parse_number(value, what, finite=True, minimum=0.0)


def _ridge(value: Any, what: str) -> float:
    return parse_number(value, what, finite=True, minimum=0.0)


def _source(d: Any, kind: str) -> dict:
    return parse_mapping(d, f"{kind} record")


# -- the adapter's fit and its metrics ----------------------------------------------------------

FIT_KEYS = ("settings", "pairs", "plan", "ridge", "counts", "timings", "warnings")


@dataclass(frozen=True)
class FitRecord:
    """The adapter's ``fit`` attribute: how the tiles were fitted (written by ``prismoe fit``)."""

    settings: dict = field(default_factory=dict)  # FitConfig.settings(grids): mode, ridge, holdout,
    # subsample, seed, alphas, solver, precision, grids; a resumed fit must match them
    pairs: dict | None = None  # the pairs store's source record the fit read (a resume must read the same)
    plan: dict | None = None  # the fit's Plan (rows, block_rows, tasks, group_cols, metric_cols, hold_cap)
    ridge: dict[str, float] | None = None  # λ per row set ("train", "sub"), fixed before the first solve
    counts: dict[str, int] | None = None  # rows used: "train", "sub", "holdout" (written when the fit ends)
    timings: dict[str, float] | None = None  # seconds per stage: statistics_s, solve_s, metrics_s
    warnings: tuple[str, ...] = ()  # solver warnings (ill-conditioned statistics), first seen first

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "settings", parse_mapping(self.settings, "fit record: settings"))
        set_(self, "pairs", _optional(self.pairs, parse_mapping, "fit record: pairs"))
        set_(self, "plan", _optional(self.plan, parse_table, "fit record: plan", parse_count))
        set_(self, "ridge", _optional(self.ridge, parse_table, "fit record: ridge", _ridge))
        set_(self, "counts", _optional(self.counts, parse_table, "fit record: counts", parse_count))
        set_(self, "timings", _optional(self.timings, parse_table, "fit record: timings", _seconds))
        set_(self, "warnings", parse_texts(self.warnings, "fit record: warnings"))
        if "holdout" in self.settings:
            parse_number(self.settings["holdout"], "fit record: settings['holdout']", finite=True, minimum=0.0)
        if "seed" in self.settings:
            parse_count(self.settings["seed"], "fit record: settings['seed']")

    def differences(self, settings: dict, pairs: dict | None) -> str:
        """What differs from another fit's ``settings`` and ``pairs``, for a refusal.

        >>> FitRecord({"ridge": None, "mode": "joint"}).differences({"ridge": 0.5, "mode": "joint"}, None)
        'settings (ridge)'
        """
        keys = sorted(k for k in set(self.settings) | set(settings) if self.settings.get(k) != settings.get(k))
        parts = [f"settings ({', '.join('workers' if k == 'grids' else k for k in keys)})"] if keys else []
        if self.pairs != pairs:
            parts.append("pairs")
        return " and ".join(parts) or "settings"

    @property
    def holdout(self) -> float | None:
        """The held-out share the fit used (``None`` when not recorded)."""
        v = self.settings.get("holdout")
        return None if v is None else float(v)

    @property
    def seed(self) -> int | None:
        """The seed of the fit's held-out split (``None`` when not recorded)."""
        v = self.settings.get("seed")
        return None if v is None else int(v)

    def to_dict(self) -> dict:
        """The stored form (fields not yet written are left out)."""
        d = {k: copy.deepcopy(getattr(self, k)) for k in FIT_KEYS[:-1] if getattr(self, k) is not None}
        if self.warnings:
            d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitRecord:
        """Read a stored ``fit`` attribute. A record without ``settings`` (early development stores
        kept them at the top level) is read with its other entries as the settings."""
        d = _source(d, "fit")
        if "settings" not in d:
            d = {"settings": {k: v for k, v in d.items() if k not in FIT_KEYS},
                 **{k: v for k, v in d.items() if k in FIT_KEYS}}
        unknown = sorted(set(d) - set(FIT_KEYS))
        if unknown:
            raise StoreError(f"fit record: unknown entries {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class Score:
    """A held-out score of one estimate (a pipe, or the pipes combined)."""

    rel_err: float  # ‖z − ẑ‖ / ‖z‖ over the held-out rows (NaN when z is all zero)
    r2: float  # 1 − SSE/SST over the held-out rows (NaN when z has no variance)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rel_err", parse_number(self.rel_err, "score: rel_err"))
        object.__setattr__(self, "r2", parse_number(self.r2, "score: r2"))

    def to_dict(self) -> dict:
        """The stored form."""
        return {"rel_err": self.rel_err, "r2": self.r2}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Score:
        """Read a stored score."""
        d = _source(d, "score")
        try:
            return cls(d["rel_err"], d["r2"])
        except KeyError as e:
            raise StoreError(f"score record lacks {e.args[0]!r}") from None


@dataclass(frozen=True)
class FitMetrics:
    """The adapter's ``metrics`` attribute: held-out scores of the fit (absent when holdout is 0)."""

    holdout_rows: int  # held-out rows scored
    pipes: tuple[Score, ...]  # one score per pipe, pipe 1 first
    combined: Score  # the α-weighted sum of the pipes
    warnings: tuple[str, ...] = ()  # the fit's solver warnings when the metrics were taken

    def __post_init__(self) -> None:
        object.__setattr__(self, "holdout_rows", parse_count(self.holdout_rows, "metrics: holdout_rows"))
        if not isinstance(self.pipes, (list, tuple)) or not all(isinstance(s, Score) for s in self.pipes):
            raise StoreError(f"metrics: pipes must be a list of scores, got {self.pipes!r}")
        object.__setattr__(self, "pipes", tuple(self.pipes))
        if not isinstance(self.combined, Score):
            raise StoreError(f"metrics: combined must be a score, got {self.combined!r}")
        object.__setattr__(self, "warnings", parse_texts(self.warnings, "metrics: warnings"))

    def to_dict(self) -> dict:
        """The stored form."""
        return {"holdout_rows": self.holdout_rows, "pipes": [s.to_dict() for s in self.pipes],
                "combined": self.combined.to_dict(), "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitMetrics:
        """Read a stored ``metrics`` attribute."""
        d = _source(d, "metrics")
        try:
            pipes = d["pipes"]
            if not isinstance(pipes, (list, tuple)):
                raise StoreError(f"metrics: pipes must be a list, got {pipes!r}")
            return cls(d["holdout_rows"], tuple(Score.from_dict(s) for s in pipes), Score.from_dict(d["combined"]),
                       tuple(d.get("warnings", ())))
        except KeyError as e:
            raise StoreError(f"metrics record lacks {e.args[0]!r}") from None


# -- gates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitRecord:
    """The held-out split gates were trained and scored with."""

    holdout: float  # share of rows held out
    seed: int  # seed of the split
    source: str = "options"  # "fit" (the adapter fit's split) or "options" (given to the job)

    def __post_init__(self) -> None:
        holdout = parse_number(self.holdout, "split: holdout", finite=True, minimum=0.0)
        if holdout >= 1.0:
            raise StoreError(f"split: holdout must be < 1, got {holdout!r}")
        object.__setattr__(self, "holdout", holdout)
        object.__setattr__(self, "seed", parse_count(self.seed, "split: seed"))
        object.__setattr__(self, "source", parse_text(self.source, "split: source"))

    def to_dict(self) -> dict:
        """The stored form."""
        return {"holdout": self.holdout, "seed": self.seed, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SplitRecord:
        """Read a stored split."""
        d = _source(d, "split")
        try:
            return cls(d["holdout"], d["seed"], d.get("source", "options"))
        except KeyError as e:
            raise StoreError(f"split record lacks {e.args[0]!r}") from None


GATES_KEYS = ("complete", "settings", "split", "metrics", "held_out")


@dataclass(frozen=True)
class GatesRecord:
    """The adapter's ``gates`` attribute: how its gates were trained (``fit-gates``, or a head's band gate)."""

    settings: dict = field(default_factory=dict)  # training settings (GateSettings as a dict; a band
    # gate's BandGateConfig with "kind"); the runtime's default sparsity and temperature come from here
    complete: bool | None = None  # False while fit-gates runs, True when it ended; None: not recorded
    # (a head's band gate is recorded once trained)
    split: SplitRecord | None = None  # the held-out split (fit-gates)
    metrics: dict | None = None  # fit-gates' held-out results: before, after, best_epoch, epochs_run, stopped_early
    held_out: dict | None = None  # a band gate's held-out top1, mass and loss

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", parse_mapping(self.settings, "gates record: settings"))
        object.__setattr__(self, "complete", _optional(self.complete, parse_flag, "gates record: complete"))
        if self.split is not None and not isinstance(self.split, SplitRecord):
            raise StoreError(f"gates record: split must be a SplitRecord, got {self.split!r}")
        object.__setattr__(self, "metrics", _optional(self.metrics, parse_mapping, "gates record: metrics"))
        object.__setattr__(self, "held_out", _optional(self.held_out, parse_mapping, "gates record: held_out"))

    @property
    def finished(self) -> bool:
        """True unless a training job recorded that it has not ended."""
        return self.complete is not False

    def to_dict(self) -> dict:
        """The stored form (fields not recorded are left out)."""
        d: dict[str, Any] = {}
        if self.complete is not None:
            d["complete"] = self.complete
        d["settings"] = copy.deepcopy(self.settings)
        if self.split is not None:
            d["split"] = self.split.to_dict()
        for k in ("metrics", "held_out"):
            if getattr(self, k) is not None:
                d[k] = copy.deepcopy(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GatesRecord:
        """Read a stored ``gates`` attribute."""
        d = _source(d, "gates")
        unknown = sorted(set(d) - set(GATES_KEYS))
        if unknown:
            raise StoreError(f"gates record: unknown entries {unknown}")
        split = d.get("split")
        return cls(settings=d.get("settings", {}), complete=d.get("complete"),
                   split=None if split is None else SplitRecord.from_dict(split), metrics=d.get("metrics"),
                   held_out=d.get("held_out"))


# -- a stored tensor of a weights store -----------------------------------------------------------

TENSOR_KEYS = ("tensor", "grid", "dtype", "complete")


def parse_dtype(value: Any, what: str) -> str:
    """A numpy dtype name, as :func:`numpy.dtype` spells it (``"float32"``)."""
    try:
        name = str(np.dtype(parse_text(value, what)))
    except TypeError:
        raise StoreError(f"{what} is not a dtype: {value!r}") from None
    if name != value:
        raise StoreError(f"{what} must be spelled as numpy does ({name!r}), got {value!r}")
    return name


def parse_grid(value: Any, what: str) -> GridSpec:
    """A :class:`~prismoe_store.grid.GridSpec` (or its dict form)."""
    if isinstance(value, GridSpec):
        return value
    try:
        return GridSpec.from_dict(parse_mapping(value, what))
    except PrismoeError as e:
        raise StoreError(f"{what}: {e}") from None


@dataclass(frozen=True)
class TensorRecord:
    """A weights-store tensor's attributes: what it is, how it is tiled, whether it is finished, where from."""

    tensor: str  # the tensor's name in the store ("lm_head.weight")
    grid: GridSpec  # the tile grid the array is chunked on (one chunk per tile)
    dtype: str  # the stored dtype ("float32", "float16", ...)
    complete: bool = False  # every tile (and the bias) written; set last
    stamp: SourceStamp | None = None  # the checkpoint's path, size and content fingerprint (None: not recorded)
    source: dict = field(default_factory=dict)  # the other provenance entries: source_format, source_tensor,
    # source_dtype, source_shape, source_resolution, source_bias (a synthetic matrix: its generator)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensor", parse_text(self.tensor, "tensor record: tensor"))
        object.__setattr__(self, "grid", parse_grid(self.grid, "tensor record: grid"))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype, "tensor record: dtype"))
        object.__setattr__(self, "complete", parse_flag(self.complete, "tensor record: complete"))
        if self.stamp is not None and not isinstance(self.stamp, SourceStamp):
            raise StoreError(f"tensor record: stamp must be a SourceStamp, got {self.stamp!r}")
        source = parse_mapping(self.source, "tensor record: source")
        clash = sorted(set(source) & set(TENSOR_KEYS))
        if clash:
            raise StoreError(f"tensor record: source entries {clash} would replace the record's own")
        object.__setattr__(self, "source", source)

    def to_dict(self) -> dict:
        """The stored form: the record's entries, the provenance entries, the stamp's entries."""
        return {"tensor": self.tensor, "grid": self.grid.to_dict(), "dtype": self.dtype, "complete": self.complete,
                **copy.deepcopy(self.source), **(self.stamp.as_attrs() if self.stamp is not None else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorRecord:
        """Read a stored tensor's attributes."""
        d = _source(d, "tensor")
        stamp = parse_stamp(d)
        rest = {k: v for k, v in d.items() if k not in TENSOR_KEYS}
        if stamp is not None:
            rest = {k: v for k, v in rest.items() if k not in stamp.as_attrs()}
        try:
            return cls(d["tensor"], d["grid"], d["dtype"], d.get("complete", False), stamp, rest)
        except KeyError as e:
            raise StoreError(f"tensor record lacks {e.args[0]!r}") from None
