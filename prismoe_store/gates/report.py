"""Reports on an adapter's gates: routing statistics, the quality table, the gate benchmark, plots.

Built on :mod:`~prismoe_store.gates.tiles`, :mod:`~prismoe_store.gates.gate`,
:mod:`~prismoe_store.gates.heldout` and :mod:`~prismoe_store.gates.training`; none of them imports this one.

- :func:`routing_stats`: per-pipe statistics of a gate over batches of tokens (utilization per
  worker, balance loss, gate entropy, energy share of the selected tiles);
  :func:`routing_report`: those of the adapter's stored gates on the held-out rows, with the
  quality table (what ``prismoe routing`` and ``prismoe inspect ADAPTER --routing PAIRS`` print);
- :func:`quality_report`: held-out relative error and R² of the zero, initialised and trained
  gates at each sparsity, beside the ``dense`` and ``lstsq`` baselines;
- :func:`benchmark_gates`: the quality table with one gate trained per sparsity (in memory);
- :func:`format_routing`, :func:`format_quality`, :func:`format_benchmark_gates`: their text;
- :func:`plot_routing`, :func:`plot_quality`: PNGs (matplotlib, imported lazily).

See ``docs/gates.md`` for what the numbers mean.

>>> import torch
>>> from prismoe_store.gates.gate import Gates
>>> from prismoe_store.gates.tiles import FrozenTiles
>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(8, 8, 4)
>>> t = FrozenTiles([torch.randn(*g.padded_shape)], [g], [1.0], "joint")
>>> st = routing_stats(t, Gates.zeros([g], 8), [torch.randn(10, 8)], sparsity=0.5)
>>> st[0]["rows"], st[0]["k"], st[0]["active"]
(10, 2, 4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from prismoe_store.errors import DataError
from prismoe_store.gates.gate import Gates, gated_forward, init_gates
from prismoe_store.gates.heldout import (
    Progress,
    Split,
    heldout_batches,
    heldout_metrics,
    open_stores,
    resolve_split,
    sample_training_rows,
)
from prismoe_store.gates.routing import Routing, active_mask, k_for, route
from prismoe_store.gates.settings import (
    DEFAULT_MAX_TILE_BYTES,
    SPARSITIES,
    GateSettings,
)
from prismoe_store.gates.tiles import FrozenTiles, torch_device
from prismoe_store.gates.training import GateRun
from prismoe_store.grid import GridSpec
from prismoe_store.plots import figure
from prismoe_store.stores.pairs import PairsStore

LSTSQ_MAX_BYTES = 256 << 20  # largest float64 training set the dense lstsq baseline loads
_HIST_BINS = 20  # bins of the per-token histograms (normalized entropy, energy share)


# -- routing statistics ------------------------------------------------------------------------


class _RoutingSums:
    """Streaming sums behind :func:`routing_stats` for one pipe."""

    def __init__(self, g: GridSpec, k: int, device):
        self.g, self.k = g, k
        self.n = 0  # tokens
        self.count = torch.zeros(g.workers, dtype=torch.float64, device=device)  # tokens routed to each worker
        self.psum = torch.zeros(g.workers, dtype=torch.float64, device=device)  # Σ softmax probabilities
        self.entropy = 0.0  # Σ per-token entropy of softmax(s) over the active workers (nats)
        self.e_sel = 0.0  # Σ energy ‖T_j x_c‖² of the selected tiles
        self.e_all = 0.0  # Σ energy of all tiles
        self.h_entropy = np.zeros(_HIST_BINS, np.int64)  # histogram of per-token normalized entropy
        self.h_share = np.zeros(_HIST_BINS, np.int64)  # histogram of per-token selected energy share

    def add(self, r: Routing, energy: torch.Tensor) -> None:
        n_act = self.g.active_count
        self.n += r.indices.shape[0]
        self.count += torch.bincount(r.indices.reshape(-1), minlength=self.g.workers).double()
        P = torch.softmax(r.scores.double(), 1)
        self.psum += P.sum(0)
        h = torch.special.entr(P).sum(1)  # [B]
        self.entropy += float(h.sum())
        e = energy.double()
        sel = e.gather(1, r.indices).sum(1)
        tot = e.sum(1)
        self.e_sel += float(sel.sum())
        self.e_all += float(tot.sum())
        hn = (h / math.log(n_act)).clamp(0, 1) if n_act > 1 else torch.zeros_like(h)
        share = torch.where(tot > 0, sel / tot.clamp_min(1e-300), torch.ones_like(tot))
        self.h_entropy += np.histogram(hn.cpu().numpy(), bins=_HIST_BINS, range=(0, 1))[0]
        self.h_share += np.histogram(share.clamp(0, 1).cpu().numpy(), bins=_HIST_BINS, range=(0, 1))[0]

    def result(self) -> dict:
        g, n = self.g, max(self.n, 1)
        act = active_mask(g).numpy()
        f = (self.count / n).cpu().numpy()  # share of tokens that select each worker
        P = (self.psum / n).cpu().numpy()
        fa = f[act]
        mean = float(fa.mean())
        u = fa / fa.sum() if fa.sum() > 0 else fa
        n_act = int(act.sum())
        u_ent = float(-(u[u > 0] * np.log(u[u > 0])).sum())
        return {
            "workers": g.workers, "active": n_act, "k": self.k, "rows": self.n,
            "grid": [g.rows, g.cols],
            "padding": (~act).reshape(g.rows, g.cols).tolist(),  # padding-only workers (never selected)
            "utilization": f.reshape(g.rows, g.cols).tolist(),  # share of tokens selecting each worker
            "utilization_mean": mean, "utilization_min": float(fa.min()), "utilization_max": float(fa.max()),
            "utilization_cv": float(fa.std() / mean) if mean > 0 else float("nan"),
            "dead_workers": int((fa == 0).sum()),
            "balance_loss": float(g.workers * (f * P).sum() / self.k),
            "token_entropy": self.entropy / n,
            "token_entropy_norm": self.entropy / n / math.log(n_act) if n_act > 1 else 0.0,
            "utilization_entropy": u_ent, "utilization_entropy_norm": u_ent / math.log(n_act) if n_act > 1 else 1.0,
            "energy_share": self.e_sel / self.e_all if self.e_all > 0 else float("nan"),
            "hist_token_entropy_norm": self.h_entropy.tolist(), "hist_energy_share": self.h_share.tolist(),
        }


def routing_stats(tiles: FrozenTiles, gates: Gates, batches, *, sparsity: float, temperature: float = 1.0,
                  progress: Progress | None = None, total: int | None = None) -> list[dict]:
    """Per-pipe routing statistics of ``gates`` over ``batches`` of ``x`` (an iterable of tensors).

    Per pipe: ``utilization`` (share of tokens that select each worker, ``[R][C]``), its mean,
    min, max and coefficient of variation over the active workers, ``dead_workers``, the balance
    loss ``W·Σ f_i P_i / K`` over all tokens, ``token_entropy`` (mean per-token entropy of the
    softmax of the raw scores over the active workers, nats; ``_norm``: divided by ``ln n``),
    ``utilization_entropy`` (entropy of the normalized utilization; ``_norm`` is 1 for perfectly
    even use), and ``energy_share``: ``Σ_tokens Σ_{j∈S} ‖T_j x_c‖² / Σ_tokens Σ_j ‖T_j x_c‖²``.

    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(8, 8, 4)
    >>> t = FrozenTiles([torch.randn(*g.padded_shape)], [g], [1.0], "joint")
    >>> st = routing_stats(t, Gates.zeros([g], 8), [torch.randn(10, 8)], sparsity=1.0)
    >>> st[0]["utilization_mean"], round(st[0]["energy_share"], 6), st[0]["balance_loss"]
    (1.0, 1.0, 1.0)
    """
    sums = [_RoutingSums(g, k_for(sparsity, g.active_count), tiles.device) for g in tiles.grids]
    done = 0
    with torch.no_grad():
        for x in batches:
            x = x.to(tiles.device)
            xs, xpad = gates.standardize(x), tiles.pad(x)
            for p, g in enumerate(tiles.grids):
                r = route(xs, gates.weights[p], gates.biases[p], grid=g, sparsity=sparsity, mode=tiles.mode,
                          temperature=temperature)
                sums[p].add(r, tiles.energies(p, xpad))
            done += x.shape[0]
            if progress and total:
                progress(min(done, total), total)
    return [s.result() for s in sums]


def routing_report(adapter, pairs, *, sparsity: float | None = None, temperature: float | None = None,
                   quality: bool = True, holdout: float | None = None, seed: int | None = None,
                   max_rows: int | None = None, device="cpu", max_tile_bytes: int = DEFAULT_MAX_TILE_BYTES,
                   progress: Progress | None = None) -> dict:
    """Routing statistics of the adapter's stored gates on the held-out rows, and (``quality``)
    the quality table of :func:`quality_report`. ``sparsity``/``temperature`` default to the
    values the gates were trained with. This is what ``prismoe routing`` and
    ``prismoe inspect ADAPTER --routing PAIRS`` print.

    >>> import numpy as np
    >>> from prismoe_store.stores.adapter import AdapterStore
    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(8, 4, 4)
    >>> p = PairsStore.create("memory://doc-gates-rr-p", d_in=8, d_out=4, overwrite=True)
    >>> x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32); _ = p.append(x, x[:, :4])
    >>> a = AdapterStore.create("memory://doc-gates-rr-a", grids=[g], overwrite=True); a.update_attrs(complete=True)
    >>> a.write_gate(0, np.zeros((g.workers, 8)), np.arange(g.workers, dtype=np.float32))
    >>> rep = routing_report(a, p, sparsity=0.5, quality=False)
    >>> rep["pipes"][0]["utilization"]
    [[0.0, 0.0], [1.0, 1.0]]
    """
    adapter, pairs = open_stores(adapter, pairs)
    settings = adapter.gate_settings()
    sparsity = float(settings.get("sparsity", 0.3)) if sparsity is None else float(sparsity)
    temperature = float(settings.get("temperature", 1.0)) if temperature is None else float(temperature)
    split = resolve_split(adapter, holdout, seed)
    dev = torch_device(device)
    tiles = FrozenTiles.load(adapter, device=dev, max_bytes=max_tile_bytes)
    gates = Gates.from_store(adapter).to(dev)
    total = split.counts(pairs)[1] if max_rows is None else max_rows
    batches = (x for x, _ in heldout_batches(pairs, split, dev, max_rows=max_rows, batch=1024))
    pipes = routing_stats(tiles, gates, batches, sparsity=sparsity, temperature=temperature,
                          progress=progress, total=total)
    out = {"adapter": adapter.url, "pairs": pairs.url, "mode": tiles.mode, "sparsity": sparsity,
           "temperature": temperature, "split": asdict(split), "gates_trained": settings, "pipes": pipes}
    if quality:
        out["quality"] = quality_report(adapter, pairs, holdout=holdout, seed=seed, max_rows=max_rows,
                                        device=device, max_tile_bytes=max_tile_bytes, _tiles=tiles)
    return out


# -- the quality report ------------------------------------------------------------------------


def _gated(tiles, gates, sparsity, temperature):
    return lambda x: gated_forward(tiles, gates, x, sparsity=sparsity, temperature=temperature)[0]


def _lstsq_baseline(pairs: PairsStore, split: Split, max_bytes: int) -> tuple[np.ndarray | None, str]:
    """Dense least squares ``W [d_out, d_in]`` on the training rows (float64), when they fit in ``max_bytes``."""
    n_train = split.counts(pairs)[0]
    need = n_train * (pairs.d_in + pairs.d_out) * 8
    if need > max_bytes:
        return None, f"skipped: {n_train} training rows take {need / 2**20:.0f} MiB (> {max_bytes / 2**20:.0f} MiB)"
    xs, zs = [], []
    for s, e in split.blocks(pairs):
        x, z = split.read(pairs, s, e, heldout=False)
        xs.append(x.astype(np.float64))
        zs.append(z.astype(np.float64))
    W = np.linalg.lstsq(np.concatenate(xs), np.concatenate(zs), rcond=None)[0].T
    return W, "numpy.linalg.lstsq on the training rows"


def quality_report(adapter, pairs, *, sparsities: Sequence[float] = SPARSITIES, gates: dict[str, Gates] | None = None,
                   temperature: float | None = None, holdout: float | None = None, seed: int | None = None,
                   max_rows: int | None = None, device="cpu", max_tile_bytes: int = DEFAULT_MAX_TILE_BYTES,
                   lstsq_max_bytes: int = LSTSQ_MAX_BYTES, progress: Progress | None = None, _tiles=None) -> dict:
    """Held-out relative error and R² of the gated adapter at each sparsity, per gate, beside baselines.

    Gates (default): ``zero`` (the untrained uniform gate: all scores tie, so ``torch.topk`` keeps
    a fixed arbitrary subset of K workers for every token), ``init`` (:func:`init_gates` with the
    trained gate's init kind, default ``gain``; untrained) and ``trained`` (the stored gate, when there is
    one). Baselines: ``dense`` — every
    tile at weight 1, which for ``joint`` tiles is the dense ridge solution of the fit — and
    ``lstsq`` (``numpy.linalg.lstsq`` on the training rows, when they take at most
    ``lstsq_max_bytes``). Returns ``{"rows": [{gate, sparsity, rel_err, r2}], "baselines": {...}}``.

    >>> import numpy as np
    >>> from prismoe_store.fit import FitConfig, fit
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 8)).astype(np.float32)
    >>> p = PairsStore.create("memory://doc-gates-q-p", d_in=8, d_out=4, overwrite=True)
    >>> _ = p.append(x, x @ rng.normal(size=(8, 4)).astype(np.float32))
    >>> a = fit(p, "memory://doc-gates-q-a", FitConfig(workers=4), scheduler="synchronous", overwrite=True)
    >>> q = quality_report(a, p, sparsities=[1.0])
    >>> q["rows"][0]["gate"], q["rows"][0]["rel_err"] < 1e-5, q["baselines"]["dense"]["rel_err"] < 1e-5
    ('zero', True, True)
    """
    adapter, pairs = open_stores(adapter, pairs)
    settings = adapter.gate_settings()
    temperature = float(settings.get("temperature", 1.0)) if temperature is None else float(temperature)
    split = resolve_split(adapter, holdout, seed)
    dev = torch_device(device)
    tiles = _tiles or FrozenTiles.load(adapter, device=dev, max_bytes=max_tile_bytes)
    if gates is None:
        gates = {"zero": Gates.zeros(tiles.grids, tiles.d_in)}
        xs, zs = sample_training_rows(pairs, split, int(settings.get("init_rows", GateSettings.init_rows)),
                               int(settings.get("seed", split.seed)))
        kind = settings.get("init", GateSettings.init)
        gates["init"] = init_gates(tiles, torch.from_numpy(xs).to(dev), torch.from_numpy(zs).to(dev),
                                   kind=GateSettings.init if kind == "zero" else kind,
                                   scale=float(settings.get("init_scale", GateSettings.init_scale)))
        if all(adapter.read_gate(p) is not None for p in range(adapter.n_pipes)):
            gates["trained"] = Gates.from_store(adapter)
    gates = {k: v.to(dev) for k, v in gates.items()}
    preds: dict[tuple[str, float | None], Callable[[torch.Tensor], torch.Tensor]] = {
        (name, rho): _gated(tiles, g, rho, temperature) for name, g in gates.items() for rho in sparsities}
    preds[("dense", None)] = tiles.dense
    lstsq, how = _lstsq_baseline(pairs, split, lstsq_max_bytes)
    if lstsq is not None:
        Wt = torch.from_numpy(lstsq.T.astype(np.float32)).to(dev)
        preds[("lstsq", None)] = lambda x: x.float() @ Wt
    m = heldout_metrics(pairs, split, {f"{k[0]}@{k[1]}": f for k, f in preds.items()}, device=dev,
                        max_rows=max_rows, progress=progress)
    rows = [{"gate": name, "sparsity": rho, **{k: m[f"{name}@{rho}"][k] for k in ("rel_err", "r2")}}
            for name in gates for rho in sparsities]
    what = ("all tiles, uniform gate (fitted joint tiles: the dense ridge solution)" if tiles.mode == "joint"
            else "all tiles, uniform gate (each band averages its independent tiles)")
    base = {"dense": {**m["dense@None"], "what": what}}
    base["lstsq"] = {**m["lstsq@None"], "what": how} if lstsq is not None else {"what": how}
    trained_at = settings.get("sparsity") if "trained" in gates else None
    return {"mode": tiles.mode, "temperature": temperature, "trained_sparsity": trained_at,
            "heldout_rows": m["dense@None"]["rows"], "split": asdict(split), "rows": rows, "baselines": base}


def benchmark_gates(adapter, pairs, config: GateSettings = GateSettings(), *,  # noqa: B008 (frozen)
                    sparsities: Sequence[float] = SPARSITIES, device="cpu",
                    max_tile_bytes: int = DEFAULT_MAX_TILE_BYTES, max_eval_rows: int | None = None,
                    progress: Progress | None = None) -> dict:
    """The quality table with one gate trained per sparsity (in memory; the store is not changed).

    For each ρ in ``sparsities``: the zero gate, the init (``config.init``), and a gate trained
    from that init at that ρ (``trained``) with ``config``'s other settings (its ``sparsity`` is
    not used; ``holdout``/``seed`` ``None``: the adapter fit's split); plus the ``dense`` and
    ``lstsq`` baselines of :func:`quality_report`. The other options are those of
    :func:`~prismoe_store.gates.training.fit_gates`.

    >>> import numpy as np
    >>> from prismoe_store.fit import FitConfig, fit
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 8)).astype(np.float32)
    >>> p = PairsStore.create("memory://doc-gates-b-p", d_in=8, d_out=4, overwrite=True)
    >>> _ = p.append(x, x @ rng.normal(size=(8, 4)).astype(np.float32))
    >>> a = fit(p, "memory://doc-gates-b-a", FitConfig(workers=4), scheduler="synchronous", overwrite=True)
    >>> sorted(r["gate"] for r in benchmark_gates(a, p, GateSettings(epochs=1), sparsities=[0.5])["rows"])
    ['init', 'trained', 'zero']
    """
    adapter, pairs = open_stores(adapter, pairs)
    if not isinstance(config, GateSettings):
        raise DataError(f"config must be a GateSettings, got {type(config).__name__}")
    split = resolve_split(adapter, config.holdout, config.seed)
    dev = torch_device(device)
    tiles = FrozenTiles.load(adapter, device=dev, max_bytes=max_tile_bytes)
    base = replace(config, holdout=split.holdout, seed=split.seed)
    epochs, temperature = base.epochs, base.temperature
    tiles.check_batch(base.batch_size, max_tile_bytes)
    xs, zs = sample_training_rows(pairs, split, base.init_rows, split.seed)  # base.seed is split.seed
    init = init_gates(tiles, torch.from_numpy(xs).to(dev), torch.from_numpy(zs).to(dev), kind=base.init,
                      scale=base.init_scale)
    z_scale = float(np.mean(np.square(zs, dtype=np.float64))) or 1.0
    trained, runs = {}, {}
    n_train = split.counts(pairs)[0]
    total = len(sparsities) * epochs * n_train
    for i, rho in enumerate(sparsities):
        s = GateSettings(**{**asdict(base), "sparsity": float(rho)})
        gates = Gates(list(init.weights), list(init.biases), mean=init.mean, scale=init.scale).to(dev)
        run = GateRun(tiles, pairs, split, s, gates=gates, z_scale=z_scale, max_eval_rows=max_eval_rows)
        run.record(None)
        offset = i * epochs * n_train
        shifted: Progress | None = (lambda d, t, o=offset: progress(o + d, total)) if progress else None
        run.train(shifted)
        trained[rho] = Gates.from_arrays(run.best_gates).to(dev)
        runs[rho] = {"best_epoch": run.best["epoch"], "epochs_run": run.epoch, "history": run.history}
    q = quality_report(adapter, pairs, sparsities=sparsities, temperature=temperature, holdout=split.holdout,
                       seed=split.seed, max_rows=max_eval_rows, device=device, _tiles=tiles,
                       gates={"zero": Gates.zeros(tiles.grids, tiles.d_in), "init": init})
    ev = heldout_metrics(pairs, split, {str(r): _gated(tiles, trained[r], r, temperature) for r in sparsities},
                         device=dev, max_rows=max_eval_rows)
    q["rows"] += [{"gate": "trained", "sparsity": r, "rel_err": ev[str(r)]["rel_err"], "r2": ev[str(r)]["r2"]}
                  for r in sparsities]
    q["training"] = {str(r): v for r, v in runs.items()}
    q["settings"] = {k: v for k, v in asdict(base).items() if k != "sparsity"}
    return q


# -- text ------------------------------------------------------------------------------------


def format_routing(report: dict) -> str:
    """Text rendering of :func:`routing_report` (statistics, then quality): what ``prismoe routing`` prints."""
    lines = [f"routing of {report['adapter']} on {report['pipes'][0]['rows']} held-out rows of {report['pairs']} "
             f"(ρ = {report['sparsity']}, temperature {report['temperature']}, {report['mode']} tiles)"]
    head = (f"{'pipe':<6}{'grid':>9}{'K/n':>9}{'util CV':>9}{'dead':>6}{'balance':>9}"
            f"{'H tok':>8}{'H util':>8}{'energy':>8}")
    lines += [head]
    for p, s in enumerate(report["pipes"]):
        lines.append(f"{p + 1:<6}{'{}×{}'.format(*s['grid']):>9}{'{}/{}'.format(s['k'], s['active']):>9}"
                     f"{s['utilization_cv']:>9.3f}{s['dead_workers']:>6}{s['balance_loss']:>9.3f}"
                     f"{s['token_entropy_norm']:>8.3f}{s['utilization_entropy_norm']:>8.3f}{s['energy_share']:>8.3f}")
    lines.append("util CV: coefficient of variation of per-worker utilization; balance: W·Σf·P/K (1 = even); "
                 "H tok / H util: per-token gate entropy and utilization entropy, ÷ ln n; energy: share of "
                 "Σ‖T x‖² in the selected tiles")
    if "quality" in report:
        lines += ["", format_quality(report["quality"])]
    return "\n".join(lines)


def format_quality(q: dict) -> str:
    """Text table of :func:`quality_report` (or :func:`benchmark_gates`): relative error (R²) per gate and ρ.

    >>> rep = {"heldout_rows": 10, "rows": [{"gate": "zero", "sparsity": 0.5, "rel_err": 0.5, "r2": 0.75}],
    ...        "baselines": {"lstsq": {"what": "skipped"}}}
    >>> print(format_quality(rep))
    held-out quality on 10 rows: relative error (R²)
    gate                   ρ = 0.5
    zero           0.5000 (0.7500)
    lstsq                        —   skipped
    """
    rhos = sorted({r["sparsity"] for r in q["rows"]})
    gates = list(dict.fromkeys(r["gate"] for r in q["rows"]))
    cell = {(r["gate"], r["sparsity"]): r for r in q["rows"]}
    lines = [f"held-out quality on {q['heldout_rows']} rows: relative error (R²)"
             + (f"; stored gate trained at ρ = {q['trained_sparsity']}" if q.get("trained_sparsity") else ""),
             f"{'gate':<10}" + "".join(f"{'ρ = ' + format(r, 'g'):>20}" for r in rhos)]
    for g in gates:
        lines.append(f"{g:<10}" + "".join(f"{_pair(cell[(g, r)]):>20}" for r in rhos))
    for name, b in q["baselines"].items():
        lines.append(f"{name:<10}{_pair(b) if 'rel_err' in b else '—':>20}   {b['what']}")
    return "\n".join(lines)


def _pair(m: dict) -> str:
    r2 = m["r2"]
    return f"{m['rel_err']:.4f} ({'nan' if math.isnan(r2) else format(r2, '.4f')})"


def format_benchmark_gates(q: dict) -> str:
    """Text of :func:`benchmark_gates`: the quality table, then each ρ's training run."""
    lines = [format_quality(q)]
    lines += [f"ρ = {rho}: trained {t['epochs_run']} epoch{'s' * (t['epochs_run'] != 1)}, best epoch {t['best_epoch']}"
              for rho, t in q["training"].items()]
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------


def plot_routing(report: dict, out_dir) -> list[str]:
    """Draw :func:`routing_report` as PNGs in ``out_dir``: utilization heatmaps over each pipe's grid
    (``routing_utilization.png``) and histograms (``routing_histograms.png``). Returns the paths.

    >>> import tempfile
    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(8, 8, 4)
    >>> t = FrozenTiles([torch.randn(*g.padded_shape)], [g], [1.0], "joint")
    >>> st = routing_stats(t, Gates.zeros([g], 8), [torch.randn(10, 8)], sparsity=0.5)
    >>> len(plot_routing({"pipes": st, "sparsity": 0.5}, tempfile.mkdtemp()))
    2
    """
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipes = report["pipes"]
    n = len(pipes)
    fig = figure(4.2 * n, 4.2)
    for p, st in enumerate(pipes):
        ax = fig.add_subplot(1, n, p + 1)
        u = np.asarray(st["utilization"], float)
        R, C = st["grid"]
        mask = np.asarray(st["padding"], bool)
        im = ax.imshow(np.ma.masked_array(u, mask), aspect="auto", cmap="viridis", vmin=0,
                       vmax=max(1e-12, float(u.max())), interpolation="nearest")
        ax.set_title(f"pipe {p + 1}: {R}×{C}, K={st['k']}/{st['active']}\nCV {st['utilization_cv']:.2f}, "
                     f"balance {st['balance_loss']:.2f}", fontsize=9)
        ax.set_xlabel("column c (input slice)")
        ax.set_ylabel("row r (output band)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="share of tokens routed")
    fig.suptitle(f"worker utilization on held-out rows (ρ = {report.get('sparsity')})", fontsize=10)
    paths = [out / "routing_utilization.png"]
    fig.savefig(paths[-1], format="png")

    fig = figure(4.2 * n, 9.0)
    edges = np.linspace(0, 1, _HIST_BINS + 1)
    for p, st in enumerate(pipes):
        u = np.asarray(st["utilization"], float)[~np.asarray(st["padding"], bool)]
        ax = fig.add_subplot(3, n, p + 1)
        ax.hist(u, bins=min(30, max(5, len(u) // 2)), color="C0")
        ax.axvline(st["k"] / st["active"], color="k", ls="--", lw=1, label="even (K/n)")
        ax.set_title(f"pipe {p + 1}: utilization per worker", fontsize=9)
        ax.set_xlabel("share of tokens")
        ax.legend(fontsize=7)
        for row, key, label in ((1, "hist_token_entropy_norm", "per-token gate entropy / ln n"),
                                (2, "hist_energy_share", "per-token energy share of selected tiles")):
            ax = fig.add_subplot(3, n, row * n + p + 1)
            ax.stairs(st[key], edges, fill=True, color="C1" if row == 1 else "C2")
            ax.set_xlabel(label)
            ax.set_ylabel("tokens")
    paths.append(out / "routing_histograms.png")
    fig.savefig(paths[-1], format="png")
    return [str(p) for p in paths]


def plot_quality(report: dict, out_dir) -> str:
    """Draw a quality report (relative error against ρ per gate, baselines as lines) as ``quality.png``.

    >>> import tempfile, os
    >>> rep = {"rows": [{"gate": "zero", "sparsity": 0.5, "rel_err": 0.5, "r2": 0.7}],
    ...        "baselines": {"dense": {"rel_err": 0.1}}, "mode": "joint"}
    >>> os.path.basename(plot_quality(rep, tempfile.mkdtemp()))
    'quality.png'
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    trained_at = report.get("trained_sparsity")
    errors = []
    for i, name in enumerate(dict.fromkeys(r["gate"] for r in report["rows"])):
        pts = sorted((r["sparsity"], r["rel_err"]) for r in report["rows"] if r["gate"] == name)
        label = f"{name} gate" + (f" (trained at ρ = {trained_at})" if name == "trained" and trained_at else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=label)
        errors += [p[1] for p in pts]
    for j, (name, b) in enumerate(report["baselines"].items()):
        if "rel_err" in b:
            ax.axhline(b["rel_err"], color=f"C{j + 5}", ls=("--", ":", "-.")[j % 3], lw=1.5, label=name)
            errors.append(b["rel_err"])
    finite = [e for e in errors if e > 0 and math.isfinite(e)]
    if finite and max(finite) > 10 * min(finite):
        ax.set_yscale("log")
    ax.set_xlabel("sparsity ρ (share of tiles per token)")
    ax.set_ylabel("held-out relative error ‖y − z‖/‖z‖")
    ax.set_title(f"gated adapter quality ({report.get('mode')} tiles)", fontsize=10)
    ax.legend(fontsize=8)
    path = out / "quality.png"
    fig.savefig(path, format="png")
    return str(path)
