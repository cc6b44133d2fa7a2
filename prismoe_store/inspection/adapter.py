"""Inspect an adapter store: fit settings and metrics, gates, INT8, and per pipe its grid, bytes and tile norms.

:func:`inspect_adapter` is the ``"adapter"`` entry of :data:`prismoe_store.inspection.common.INSPECTORS`
(reach it through :func:`prismoe_store.inspection.common.inspect_store`); it returns an :class:`AdapterReport`
with one :class:`PipeReport` per pipe, whose tile statistics are streamed a few tiles at a time.

>>> from prismoe_store.stores.adapter import AdapterStore
>>> g = GridSpec(d_in=4, d_out=4, rows=1, cols=2, tile_out=4, tile_in=2)
>>> a = AdapterStore.create("memory://doc-inspect-adapter", grids=[g], overwrite=True)
>>> rep = inspect_adapter("memory://doc-inspect-adapter")
>>> rep.complete, rep.pipes[0].stats is None, rep.text().splitlines()[2]
(False, True, '  fit: none recorded')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prismoe_store.fit.solve import describe_ridge
from prismoe_store.grid import GridSpec
from prismoe_store.inspection.common import (
    DEFAULT_MAX_BYTES,
    CheckedRegion,
    ProgressFn,
    TileStats,
    codec_names,
    human_bytes,
    jsonable,
    pick_name,
    short_value,
    tile_stats,
)
from prismoe_store.stores.formats import FORMAT_KEY
from prismoe_store.stores.progress import Progress


@dataclass(frozen=True)
class PipeReport:
    """What :func:`inspect_adapter` reports about one pipe."""

    pipe: int  # 0-based pipe index (stored as pipe{pipe + 1})
    grid: GridSpec  # the pipe's grid
    fitted_rows: int | None  # training rows the pipe was fitted on (None before the fit finished)
    codecs: list[str]  # bytes-to-bytes codecs of each tile chunk, in order
    bytes_memory: int  # bytes of the padded float32 tile array
    bytes_disk: int  # bytes the float32 tiles take in the store
    int8_bytes_memory: int | None  # bytes of the INT8 tiles plus their float32 scales (None: not quantized)
    int8_bytes_disk: int | None  # bytes they take in the store
    gate: dict | None  # None without a gate; else its shape, and with statistics its norm and bias range
    stats: TileStats | None = None  # per-tile statistics (None: adapter incomplete or not asked)

    @property
    def bytes_live(self) -> int:
        """Bytes of the float32 tiles that hold data (those a runtime loads; padding-only tiles are never stored)."""
        return self.grid.active_count * self.grid.tile_bytes(4)

    @property
    def tile_bytes_int8(self) -> int:
        """Bytes of one INT8 tile with its per-row float32 scales."""
        return self.grid.tile_out * self.grid.tile_in + 4 * self.grid.tile_out

    def to_dict(self) -> dict:
        """JSON-ready dict (statistics with per-tile arrays)."""
        g = self.grid
        return jsonable({
            "pipe": self.pipe, "name": f"pipe{self.pipe + 1}", "grid": g.to_dict(), "tile_shape": list(g.tile_shape),
            "workers": g.workers, "active_workers": g.active_count, "padding_workers": g.workers - g.active_count,
            "padding_fraction": g.padding_fraction, "fitted_rows": self.fitted_rows, "codecs": self.codecs,
            "tile_bytes_fp32": g.tile_bytes(4),
            "tile_bytes_int8": self.tile_bytes_int8 if self.int8_bytes_memory is not None else None,
            "bytes_memory": self.bytes_memory, "bytes_live": self.bytes_live, "bytes_disk": self.bytes_disk,
            "int8_bytes_memory": self.int8_bytes_memory, "int8_bytes_disk": self.int8_bytes_disk,
            "gate": self.gate, "stats": None if self.stats is None else self.stats.to_dict(),
        })

    def text(self) -> str:
        """A few indented lines for humans."""
        g = self.grid
        fitted = f"; fitted on {self.fitted_rows} rows" if self.fitted_rows is not None else ""
        lines = [
            f"pipe {self.pipe + 1}: {g}",
            f"  padding {100 * g.padding_fraction:.2f}% of the padded matrix, {g.active_count}/{g.workers} workers "
            f"active ({g.workers - g.active_count} padding-only){fitted}",
            f"  tile {g.tile_out} × {g.tile_in}: {human_bytes(g.tile_bytes(4))} fp32"
            + (f", {human_bytes(self.tile_bytes_int8)} INT8 with scales" if self.int8_bytes_memory is not None else ""),
            f"  tiles {human_bytes(self.bytes_live)} fp32 in memory (the {g.active_count} that hold "
            f"data; {human_bytes(self.bytes_memory)} with the padding-only ones), {human_bytes(self.bytes_disk)} on "
            f"disk; codecs {' + '.join(self.codecs)}",
        ]
        if self.int8_bytes_memory is not None and self.int8_bytes_disk is not None:  # both set, or neither
            lines.append(f"  INT8 tiles + scales {human_bytes(g.active_count * self.tile_bytes_int8)} in memory (the "
                         f"tiles that hold data), {human_bytes(self.int8_bytes_disk)} on disk")
        if self.gate is None and self.grid.is_band_grid:
            lines.append("  gate: the adapter's band gate (one score per band, all pipes together)")
        elif self.gate is None:
            lines.append("  gate: none (train one with `prismoe fit-gates`)")
        else:
            gt = self.gate
            extra = (f", ‖W_g‖_F {gt['weight_norm']:.4g}, bias {gt['bias_min']:.4g} … {gt['bias_max']:.4g}"
                     if "weight_norm" in gt else "")
            lines.append(f"  gate: [{gt['shape'][0]} × {gt['shape'][1]}]{extra}")
        if self.stats is not None:
            s = self.stats.summary()
            lines.append(f"  tile norms: min {s['tile_norm_min']:.4g} (worker {s['tile_norm_argmin']}), median "
                         f"{s['tile_norm_median']:.4g}, max {s['tile_norm_max']:.4g} (worker "
                         f"{s['tile_norm_argmax']}); whole pipe {s['frobenius']:.4g}, absmax {s['absmax']:.4g}, "
                         f"non-finite {s['nonfinite']}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`inspect_adapter` reports about an adapter store."""

    url: str  # where the store is
    version: int  # format version
    d_in: int  # input width M
    d_out: int  # output width N
    mode: str  # "joint" or "independent"
    alphas: list[float]  # pipe weights
    complete: bool  # True once the fit has written every tile
    options: dict  # the store's encoding options
    fit: dict  # the "fit" attribute: settings, source pairs, ridge, row counts, plan, timings
    metrics: dict  # the "metrics" attribute: held-out relative error and R² per pipe and combined
    gates: dict  # the "gates" attribute: gate-training settings, split and metrics ({} before fit-gates)
    int8: dict  # the "int8" attribute ({} before quantize)
    jobs: dict  # progress record name -> [done, units]
    pipes: list[PipeReport] = field(default_factory=list)  # the pipes inspected
    head: dict = field(default_factory=dict)  # a head adapter's layout, bands, order and band gate ({} otherwise)

    def to_dict(self) -> dict:
        """One JSON object for ``--json``."""
        return jsonable({
            "url": self.url, "format": "adapter", "version": self.version, "d_in": self.d_in, "d_out": self.d_out,
            "mode": self.mode, "alphas": self.alphas, "complete": self.complete, "options": self.options,
            "fit": self.fit, "metrics": self.metrics, "gates": self.gates, "int8": self.int8, "jobs": self.jobs,
            "pipes": [p.to_dict() for p in self.pipes], "head": self.head,
        })

    def text(self) -> str:
        """The human summary of the store."""
        opts = ", ".join(f"{k} {v}" for k, v in self.options.items())
        state = "complete" if self.complete else (
            f"INCOMPLETE: re-run `prismoe {'head' if self.head else 'fit'}` to finish it")
        layout = (f"{len(self.alphas)} pipes of whole rows (a head)" if self.head else
                  f"{self.mode} tiles, {len(self.alphas)} pipes, alphas {', '.join(f'{a:.4g}' for a in self.alphas)}")
        lines = [f"{self.url}: adapter store, format version {self.version} ({opts})",
                 f"  {self.d_in} → {self.d_out} (d_in → d_out), {layout}; {state}"]
        if self.head:
            h = self.head
            lines.append(f"  head adapter: {h['layout']} layout, {h['combine']} combine (fill {h['fill']}), "
                         f"{h['bands']} bands of {h['band_rows']} rows, {h['order']} order"
                         + (f" (cohesion {h['cohesion']:.3f})" if isinstance(h.get("cohesion"), float)
                            and h["cohesion"] == h["cohesion"] else "")
                         + f"; band gate {h['gate']}")
            held = (self.gates or {}).get("held_out")
            if held:
                lines.append(f"    band gate held-out: top-1 band recall {held['top1']:.4f}, mass kept "
                             f"{held['mass']:.4f} at ρ = {(self.gates.get('settings') or {}).get('sparsity')}")
        else:
            lines += _fit_lines(self.fit, self.metrics)
            lines += _gate_lines(self.gates)
        if self.int8:
            lines.append(f"  INT8: {self.int8.get('scheme', '?')}, "
                         + ("complete" if self.int8.get("complete") else "INCOMPLETE (re-run `prismoe quantize`)"))
        if self.jobs:
            lines.append("  jobs: " + ", ".join(f"{k} {d}/{u}" for k, (d, u) in self.jobs.items()))
        return "\n".join(lines + [p.text() for p in self.pipes])

    def heatmaps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Tile-norm heatmap of each pipe that has statistics."""
        return {f"pipe {p.pipe + 1} tile norms": (p.stats.on_grid("norm"), p.stats.on_grid("padding"))
                for p in self.pipes if p.stats is not None}

    def plot(self, out_dir) -> list:
        """Write one tile-norm heatmap per pipe as a PNG into ``out_dir``; return their paths."""
        from prismoe_store.plots import report_heatmaps

        return report_heatmaps(self, out_dir)


_UNSET = {"ridge": "auto (scale-aware)", "alphas": "equal", "memory_budget": "auto", "tasks": "auto",
          "block_rows": "auto"}  # how a fit setting left at None reads


def _fit_lines(fit: dict, metrics: dict) -> list[str]:
    if not fit:
        return ["  fit: none recorded"]
    settings = {k: v for k, v in (fit.get("settings") or {}).items() if k != "grids"}
    lines = ["  fit: " + ", ".join(f"{k} {short_value(v) if v is not None else _UNSET.get(k, 'default')}"
                                   for k, v in settings.items())]
    src = fit.get("pairs") or {}
    counts = fit.get("counts") or {}
    if src or counts:
        sets = ", ".join(f"{v} {k}" for k, v in counts.items()) + " rows" if counts else \
            "rows per set (train, sub, holdout) are recorded when the fit finishes"
        lines.append(f"    on {src.get('url', '?')} ({src.get('rows', '?')} rows): {sets}")
    if fit.get("ridge"):
        lines.append("    ridge λ: " + describe_ridge(fit["ridge"], (fit.get("settings") or {}).get("ridge")))
    if metrics:
        lines.append(f"  held-out metrics on {metrics.get('holdout_rows', '?')} rows (relative error, R²):")
        rows = [(f"pipe {p + 1}", m) for p, m in enumerate(metrics.get("pipes") or [])]
        rows += [("combined", metrics["combined"])] if metrics.get("combined") else []
        lines += [f"    {name:<10}{short_value(m.get('rel_err')):>12}{_r2(m.get('r2')):>12}" for name, m in rows]
        lines += [f"    warning: {w}" for w in metrics.get("warnings") or []]
    return lines


def _r2(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else "—"


def _gate_lines(gates: dict) -> list[str]:
    if not gates:
        return ["  gates: none (train them with `prismoe fit-gates`)"]
    s = gates.get("settings") or {}
    lines = [f"  gates: {'trained' if gates.get('complete') else 'training INCOMPLETE (re-run `prismoe fit-gates`)'}",
             "    settings: " + ", ".join(f"{k} {short_value(v)}" for k, v in s.items())]
    m = gates.get("metrics") or {}
    if m:
        before = m.get("before") or {}
        cells = [(f"{k} gate", before[k]) for k in ("zero", "init") if k in before]
        cells += [("trained gate", m["after"])] if m.get("after") else []
        cells += [("dense (ρ=1)", before["dense"])] if "dense" in before else []
        errors = ", ".join(f"{k} {short_value(v.get('rel_err'))}" for k, v in cells)
        epochs = f"best epoch {m.get('best_epoch')} of {m.get('epochs_run')}"
        lines.append(f"    held-out relative error: {errors} ({epochs})")
    return lines


def inspect_adapter(url, *, tensor: str | None = None, stats: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                    progress: ProgressFn | None = None, storage_options: dict | None = None) -> AdapterReport:
    """Inspect an adapter store: shape, mode, fit settings and metrics, gate settings, and per pipe
    (every pipe, or only ``tensor`` such as ``"pipe1"``) its grid, bytes (fp32 and INT8), gate and
    per-tile statistics streamed a few tiles at a time (complete adapters only).

    >>> from prismoe_store.stores.adapter import AdapterStore
    >>> g = GridSpec(d_in=4, d_out=6, rows=2, cols=2, tile_out=4, tile_in=2)
    >>> a = AdapterStore.create("memory://doc-inspect-a", grids=[g], overwrite=True)
    >>> for r in range(2): a.write_band(0, r, np.full((4, 4), r + 1.0, np.float32))
    >>> a.update_attrs(complete=True)
    >>> r = inspect_adapter("memory://doc-inspect-a")
    >>> r.pipes[0].stats.norm.round(3).tolist(), r.pipes[0].gate  # band 1 has 2 true rows of 2.0
    ([2.828, 2.828, 4.0, 4.0], None)
    """
    from prismoe_store.stores.adapter import AdapterStore

    store = AdapterStore.open(url, storage_options=storage_options)
    attrs = store.attrs()
    names = [f"pipe{p + 1}" for p in range(store.n_pipes)]
    pipes = [names.index(pick_name(names, tensor, str(url)))] if tensor is not None else range(store.n_pipes)
    grids = store.grids
    total, done = sum(grids[p].active_count for p in pipes), 0
    reports = []
    for p in pipes:
        g, group = grids[p], store.group[f"pipe{p + 1}"]
        tiles = store.tiles(p)
        int8 = store.int8_arrays(p) if "tiles_int8" in group and "scales" in group else None
        pipe_stats = None
        if stats and store.complete:
            tick = None if progress is None else (lambda d, _t, o=done: progress(o + d, total))
            pipe_stats = tile_stats(CheckedRegion(tiles, (g.d_out, g.d_in), f"tiles of pipe {p + 1} in {url}"), g,
                                    max_bytes=max_bytes, progress=tick)
            done += g.active_count
        reports.append(PipeReport(
            pipe=p, grid=g, fitted_rows=group.attrs.get("rows"),
            codecs=codec_names(tiles), bytes_memory=int(tiles.nbytes),
            bytes_disk=int(tiles.nbytes_stored()),
            int8_bytes_memory=None if int8 is None else int(sum(a.nbytes for a in int8)),
            int8_bytes_disk=None if int8 is None else int(sum(a.nbytes_stored() for a in int8)),
            gate=_gate_info(store, p, stats), stats=pipe_stats))
    jobs: dict[str, list[int]] = {}
    if "_progress" in store.group:
        for name, _ in sorted(store.group["_progress"].arrays()):
            record = Progress.open(store.group, name)
            assert record is not None, f"{name} is listed under _progress"
            jobs[name] = [len(record.done()), record.units]
    head = {}
    if store.layout == "partition":
        gate = store.group["gate_weight"].shape if {"gate_weight", "gate_bias"} <= set(store.group.array_keys()) \
            else None
        if stats or gate is None:
            store.read_band_gate()  # a lost or damaged gate is refused, as infer refuses it
        info = attrs.get("head") or {}
        head = {"layout": store.layout, "combine": store.combine, "fill": attrs.get("fill"), "bands": store.n_bands,
                "band_rows": store.band_rows, "order": (info.get("order") or {}).get("method", "?"),
                "cohesion": info.get("cohesion"), "source": info.get("source"),
                "gate": "none" if gate is None else f"[{gate[0]} × {gate[1]}]"}
    return AdapterReport(
        head=head, url=str(url), version=int(attrs[FORMAT_KEY]["version"]), d_in=store.d_in, d_out=store.d_out,
        mode=store.mode, alphas=store.alphas, complete=store.complete, options=dict(attrs.get("options", {})),
        fit=_stored(store.fit_record()), metrics=_stored(store.metrics_record()),
        gates=_stored(store.gates_record()), int8=dict(attrs.get("int8") or {}), jobs=jobs, pipes=reports)


def _gate_info(store, pipe: int, stats: bool) -> dict | None:
    """A pipe's gate: None without one; its shape, and with ``stats`` its norm and bias range."""
    group = store.group[f"pipe{pipe + 1}"]
    if not {"gate_weight", "gate_bias"} <= set(group.array_keys()):
        store.read_gate(pipe)  # a lost or half gate is refused as infer refuses it; None: not trained yet
        return None
    info: dict[str, Any] = {"shape": list(group["gate_weight"].shape)}
    if stats:
        w, b = store.read_gate(pipe)
        w64, b64 = np.asarray(w, np.float64), np.asarray(b, np.float64)
        info.update(weight_norm=float(np.linalg.norm(w64)), bias_min=float(b64.min()), bias_max=float(b64.max()),
                    bias_mean=float(b64.mean()))
    return info


def _stored(record) -> dict:
    """A stored record's dict form (``{}`` when the adapter has none)."""
    return record.to_dict() if record is not None else {}
