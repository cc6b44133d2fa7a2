"""The main job end to end: ``prismoe train`` (collect → fit → fit-gates → quantize), and its report text.

:func:`train` chains the four stages. Each stage is resumable on its own (its store records what
is done), and the pipeline reads the stores' states before each stage:

- **collect** is skipped when the pairs store already holds every document of the texts (or the
  ``max_tokens`` cap) with the same settings; otherwise :func:`prismoe_store.data.collect.collect`
  resumes it. Without models and texts the stage uses an existing pairs store as it is.
- **fit** is skipped when the adapter is complete, fitted on the same pairs (same row count) with
  the same mode and worker count; an unfinished fit is resumed; an adapter fitted on fewer rows
  than the pairs now hold is refitted (it is derived data of the pairs).
- **gates** are skipped when the adapter's gates finished with the same settings; an interrupted
  training resumes from its last saved epoch; other settings restart it.
- **quantize** (only with ``int8``) is skipped when the INT8 tiles are complete, else resumed.

:func:`format_train` and :func:`format_stage` are its text. ``prismoe demo`` runs it on the sample
data: :mod:`prismoe_store.demo`.

>>> import tempfile, numpy as np
>>> from prismoe_store.stores.pairs import PairsStore
>>> d = tempfile.mkdtemp()
>>> p = PairsStore.create(d + "/p.zarr", d_in=8, d_out=8, overwrite=True)
>>> x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
>>> _ = p.append(x, x @ np.eye(8, dtype=np.float32))
>>> cfg = TrainConfig(workers=4, epochs=1, scheduler="synchronous")
>>> [s.status for s in train(None, None, None, d + "/a.zarr", pairs=d + "/p.zarr", config=cfg).stages]
['skipped', 'ran', 'ran', 'off']
>>> [s.status for s in train(None, None, None, d + "/a.zarr", pairs=d + "/p.zarr", config=cfg).stages]
['skipped', 'skipped', 'skipped', 'off']
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prismoe_store.data.collect import CollectSpec
from prismoe_store.errors import DataError, StoreError, StoreFormatError
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore
from prismoe_store.stores.records import FitRecord, GatesRecord

ProgressFn = Callable[[int, int], None]
StageProgress = Callable[[str], ContextManager[ProgressFn | None]]  # stage name -> context yielding (done, total)
Log = Callable[[str], None]
STAGES = ("collect", "fit", "gates", "quantize")
STATUSES = ("ran", "resumed", "skipped", "off")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (the stages' own defaults unless changed).

    >>> TrainConfig(sparsity=0.5, int8=True).int8
    True
    """

    # a CollectSpec (layer, target, pooling, batch, device, ...); None: CollectSpec()
    collect: CollectSpec | None = None
    mode: str = "joint"  # fit mode: "joint" or "independent"
    workers: int = 512  # tiles per pipe (a power of 2)
    ridge: float | None = None  # ridge λ; None: the fit's scale-aware default
    holdout: float = 0.1  # share of rows held out (fit metrics, gate early stopping, benchmark)
    seed: int = 0  # seed of the held-out split and pipe 2's subsample
    scheduler: str | None = None  # fit: "threads" (default), "processes", "synchronous" or a tcp:// address
    memory_budget: int | None = None  # fit: bytes for statistics and row blocks; None: 1/4 of RAM
    sparsity: float = 0.3  # ρ the gates are trained at
    epochs: int = 30  # most gate-training epochs (early stopping on held-out rows)
    device: str = "cpu"  # gate-training device
    int8: bool = False  # also write INT8 tiles (the quantize stage)

    def __post_init__(self) -> None:
        from prismoe_store.fit import FitConfig

        if self.collect is None:
            object.__setattr__(self, "collect", CollectSpec())
        elif not isinstance(self.collect, CollectSpec):
            raise DataError(f"collect must be a CollectSpec, got {type(self.collect).__name__}")
        FitConfig(mode=self.mode, workers=self.workers, ridge=self.ridge, holdout=self.holdout, seed=self.seed,
                  memory_budget=self.memory_budget)  # validates
        if self.holdout <= 0:
            raise DataError("holdout must be > 0: gate training stops early on held-out rows")
        self.gate_config()  # validates

    def gate_config(self):
        """The :class:`~prismoe_store.gates.settings.GateSettings` this pipeline trains the gates with."""
        from prismoe_store.gates.settings import GateSettings

        return GateSettings(sparsity=self.sparsity, epochs=self.epochs, holdout=self.holdout, seed=self.seed)

    def gate_settings(self) -> dict:
        """The gate settings this pipeline trains with (as stored by ``fit_gates``)."""
        return asdict(self.gate_config())


@dataclass
class StageResult:
    """What one stage did."""

    name: str  # "collect", "fit", "gates" or "quantize"
    status: str  # "ran", "resumed" (finished an interrupted run), "skipped" (already done) or "off"
    seconds: float = 0.0  # wall time of the stage
    detail: dict = field(default_factory=dict)  # the stage's numbers (rows, metrics, ...) and reason


@dataclass
class TrainReport:
    """The pipeline's summary: one :class:`StageResult` per stage, in order."""

    adapter: str  # the adapter store
    pairs: str  # the pairs store
    stages: list[StageResult] = field(default_factory=list)  # collect, fit, gates, quantize

    def stage(self, name: str) -> StageResult:
        """The result of stage ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"adapter": self.adapter, "pairs": self.pairs, "stages": [asdict(s) for s in self.stages]}


def default_pairs_path(adapter: str) -> str:
    """Where ``train`` puts the pairs when ``pairs`` is not given: beside the adapter.

    >>> default_pairs_path("out/head.zarr"), default_pairs_path("memory://head")
    ('out/head.pairs.zarr', 'memory://head.pairs.zarr')
    """
    base = str(adapter).rstrip("/")
    root, ext = os.path.splitext(base)
    return (root if ext == ".zarr" else base) + ".pairs.zarr"


def train(upper, lower, texts: Sequence[str] | None, adapter, *, pairs=None, config: TrainConfig | None = None,
          overwrite: bool = False, progress: StageProgress | None = None, log: Log | None = None) -> TrainReport:
    """Run collect → fit → fit-gates → (``config.int8``) quantize into ``adapter``, skipping finished stages.

    ``upper``/``lower`` are model paths (``lower`` ``None``: the upper model) and ``texts`` the text
    files to collect on; with ``upper`` and ``texts`` both ``None`` the collect stage is skipped
    and ``pairs`` must name an existing pairs store. ``pairs`` defaults to
    :func:`default_pairs_path` of ``adapter``. ``overwrite`` redoes every stage from scratch.
    ``progress(stage)`` returns a context manager yielding a ``(done, total)`` callback (e.g.
    ``lambda s: cli.progress.bar(s)``); ``log(message)`` receives one line per stage. See the module
    docstring for when a stage is skipped.
    """
    cfg = config or TrainConfig()
    adapter = str(adapter)
    pairs = str(pairs) if pairs is not None else default_pairs_path(adapter)
    if _same_place(pairs, adapter):
        raise DataError(f"the pairs store and the adapter must be different stores (both are {adapter})")
    progress = progress or (lambda stage: nullcontext(None))
    say = log or (lambda msg: None)
    report = TrainReport(adapter=adapter, pairs=pairs)

    def run(name: str, fn) -> StageResult:
        t0 = time.perf_counter()
        with progress(name) as prog:
            res = fn(prog)
        res.seconds = time.perf_counter() - t0
        report.stages.append(res)
        say(format_stage(res))
        return res

    run("collect", lambda prog: _collect_stage(upper, lower, texts, pairs, cfg, overwrite, prog, say))
    fit_res = run("fit", lambda prog: _fit_stage(pairs, adapter, cfg, overwrite, prog))
    fresh = fit_res.status == "ran"
    run("gates", lambda prog: _gates_stage(adapter, pairs, cfg, overwrite or fresh, prog))
    run("quantize", lambda prog: _quantize_stage(adapter, cfg, prog))
    return report


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


# -- the stages --------------------------------------------------------------------------------


def _collect_stage(upper, lower, texts, pairs: str, cfg: TrainConfig, overwrite: bool, prog, say) -> StageResult:
    from prismoe_store.data.collect import collect

    if upper is None and not texts:
        try:
            store = PairsStore.open(pairs)
        except StoreFormatError:
            raise
        except StoreError:
            raise DataError(f"no pairs store at {pairs}: give the models and texts to collect it "
                            "(--upper, --text), or --pairs PAIRS of an existing store") from None
        return StageResult("collect", "skipped", detail={"reason": "existing pairs (no models or texts given)",
                                                         "rows_total": store.rows})
    if upper is None or not texts:
        raise DataError("collecting pairs needs both the upper model and at least one text file")
    spec = cfg.collect
    assert spec is not None, "TrainConfig fills in CollectSpec()"
    state, prior = ("none", None) if overwrite else _collect_state(upper, lower, texts, pairs, spec)
    if state == "done":
        assert prior is not None, "a finished collection has its store"
        return StageResult("collect", "skipped", detail={"reason": "every document already collected",
                                                         "rows_total": prior.rows,
                                                         "tokens_total": int(prior.provenance.get("tokens", 0))})
    rep = collect(upper, lower, list(texts), pairs, spec=spec, overwrite=overwrite, progress=prog,
                  notice=lambda m: say(f"note: {m}"))
    return StageResult("collect", "resumed" if state == "partial" else "ran", detail=rep.as_dict())


def _collect_state(upper, lower, texts, pairs: str, spec) -> tuple[str, PairsStore | None]:
    """``("done" | "partial" | "none", store)``: how far an earlier collection into ``pairs`` got,
    judged from the store's provenance without loading the models."""
    from prismoe_store.data.texts import scan_text

    try:
        store = PairsStore.open(pairs)
    except StoreFormatError:
        return "none", None  # collect() gives the clear error
    except StoreError:
        return "none", None
    prov = store.provenance
    settings = prov.get("settings") or {}
    if prov.get("kind") != "collected":
        return "partial", store  # collect() refuses a store it did not make, with a clear message
    same = (settings.get("target") == spec.target and spec.target != "hidden"  # lower_layer needs the model
            and settings.get("max_length") == spec.max_length and settings.get("dtype") == spec.dtype
            and prov.get("pool_asked") == spec.pool and prov.get("layer_asked") == spec.layer
            and _model_matches(prov.get("upper"), upper)
            and _model_matches(prov.get("lower"), upper if lower is None else lower))
    if not same:
        return "partial", store  # collect() compares the full settings and says what differs
    if spec.max_tokens is not None and int(prov.get("tokens", 0)) >= spec.max_tokens:
        return "done", store
    recorded = prov.get("texts") or {}
    for t in texts:
        src = scan_text(t)
        entry = recorded.get(src.sha256)
        if entry is None or sum(b - a for a, b in entry.get("done", [])) < src.documents:
            return "partial", store
    return "done", store


def _model_matches(info, given) -> bool:
    if not isinstance(info, dict) or "path" not in info or given is None:
        return False
    recorded, path = Path(info["path"]), Path(str(given)).expanduser().resolve()
    return recorded == path or recorded.parent == path


def _fit_stage(pairs: str, adapter: str, cfg: TrainConfig, overwrite: bool, prog) -> StageResult:
    from prismoe_store.fit import FitConfig, fit

    store = PairsStore.open(pairs)
    existing = None if overwrite else _open_adapter(adapter)
    reason = None
    if existing is not None and existing.complete:
        info = existing.fit_record() or FitRecord()
        settings, source = info.settings, info.pairs or {}
        if settings.get("mode") != cfg.mode or existing.grids[0].workers != cfg.workers:
            raise StoreError(f"{adapter} is a finished adapter fitted with mode={settings.get('mode')}, "
                             f"{existing.grids[0].workers} workers: pass --overwrite to refit, or give another -o")
        if not _same_place(str(source.get("url", "")), pairs):
            raise StoreError(f"{adapter} is a finished adapter fitted on other pairs ({source.get('url')}): "
                             "pass --overwrite to refit, or give another -o")
        if int(source.get("rows", -1)) == store.rows:
            return StageResult("fit", "skipped", detail={"reason": "adapter complete", **_fit_detail(existing)})
        reason = f"the pairs grew from {source.get('rows')} to {store.rows} rows: refitting"
    resumed = existing is not None and not existing.complete
    config = FitConfig(mode=cfg.mode, workers=cfg.workers, ridge=cfg.ridge, holdout=cfg.holdout, seed=cfg.seed,
                       memory_budget=cfg.memory_budget)
    a = fit(store, adapter, config, scheduler=cfg.scheduler, progress=prog, overwrite=overwrite or reason is not None)
    detail = _fit_detail(a)
    if reason:
        detail["reason"] = reason
    return StageResult("fit", "resumed" if resumed else "ran", detail=detail)


def _open_adapter(url: str) -> AdapterStore | None:
    try:
        return AdapterStore.open(url)
    except StoreFormatError:
        raise StoreError(f"{url} exists and is not an adapter store: give another -o (or --overwrite)") from None
    except StoreError:
        return None


def _fit_detail(a: AdapterStore) -> dict:
    info, metrics = a.fit_record() or FitRecord(), a.metrics_record()
    return {"mode": a.mode, "grids": [str(g) for g in a.grids], "counts": info.counts,
            "metrics": metrics.to_dict() if metrics else None}


def _gates_stage(adapter: str, pairs: str, cfg: TrainConfig, restart: bool, prog) -> StageResult:
    from prismoe_store.gates.training import fit_gates

    a = AdapterStore.open(adapter, "r+", require_complete=True)
    info = a.gates_record() or GatesRecord()
    stored = info.settings
    want = cfg.gate_settings()
    ignore = ("epochs", "patience")
    same = bool(stored) and all(stored.get(k) == v for k, v in want.items() if k not in ignore)
    if info.complete and same and stored.get("epochs") == cfg.epochs:
        return StageResult("gates", "skipped", detail={"reason": "gates complete", "sparsity": cfg.sparsity,
                                                       "metrics": info.metrics})
    r = fit_gates(a, pairs, cfg.gate_config(), device=cfg.device, restart=restart or (bool(stored) and not same),
                  progress=prog)
    detail = {k: r[k] for k in ("sparsity", "k", "epochs_run", "best_epoch", "stopped_early", "before", "after")}
    return StageResult("gates", "resumed" if r["resumed_from"] is not None else "ran", detail=detail)


def _quantize_stage(adapter: str, cfg: TrainConfig, prog) -> StageResult:
    from prismoe_store.runtime.quant import int8_ready, quantize_adapter

    if not cfg.int8:
        return StageResult("quantize", "off", detail={"reason": "no --int8"})
    a = AdapterStore.open(adapter, "r+", require_complete=True)
    if int8_ready(a):
        return StageResult("quantize", "skipped", detail={"reason": "INT8 tiles complete"})
    rep = quantize_adapter(a, progress=prog)
    return StageResult("quantize", "resumed" if rep.skipped else "ran", detail=asdict(rep))


# -- reporting ---------------------------------------------------------------------------------


def format_stage(s: StageResult) -> str:
    """One line about a stage.

    >>> format_stage(StageResult("fit", "skipped", 0.01, {"reason": "adapter complete"}))
    'fit: skipped (adapter complete)'
    """
    d = s.detail
    if s.status in ("skipped", "off"):
        return f"{s.name}: {s.status} ({d.get('reason', '')})"
    head = f"{s.name}: {s.status} in {s.seconds:.1f} s"
    if s.name == "collect":
        return f"{head}: {d.get('rows_added')} pairs added, {d.get('rows_total')} in the store"
    if s.name == "fit":
        m = (d.get("metrics") or {}).get("combined")
        c = d.get("counts") or {}
        q = f", held-out relative error {m['rel_err']:.4f}, R² {m['r2']:.4f}" if m else ""
        return f"{head}: {c.get('train')} training rows{q}" + (f" ({d['reason']})" if d.get("reason") else "")
    if s.name == "gates":
        b, a = d["before"], d["after"]
        return (f"{head}: ρ = {d['sparsity']}, {d['epochs_run']} epochs (best {d['best_epoch']}); held-out relative "
                f"error {b['init']['rel_err']:.4f} (init gate) → {a['rel_err']:.4f} "
                f"(dense {b['dense']['rel_err']:.4f})")
    if s.name == "quantize":
        return (f"{head}: {d['tiles']} tiles, {d['bytes_int8'] / 2**20:.2f} MiB INT8 for {d['bytes_fp32'] / 2**20:.2f} "
                f"MiB fp32, largest tile error {d['max_rel_error']:.1e}")
    return head


def format_train(report: TrainReport) -> str:
    """The pipeline's summary as text: one line per stage, then where things are."""
    lines = [f"train → {report.adapter} (pairs: {report.pairs})"]
    lines += ["  " + format_stage(s) for s in report.stages]
    done = sum(s.status in ("ran", "resumed") for s in report.stages)
    lines.append(f"  {done} stage(s) run, {sum(s.status == 'skipped' for s in report.stages)} skipped; "
                 f"total {sum(s.seconds for s in report.stages):.1f} s")
    return "\n".join(lines)
