"""Gate training: Adam on the frozen tiles, early stopping on held-out rows, resumable by epoch.

:func:`fit_gates` trains every pipe's gate with Adam on ``MSE(y, z)/mean(z²) + β·balance +
γ·z_loss`` over minibatches streamed from the pairs store (training rows only: the held-out rows
are the fit's seeded split), stops early on held-out error, and saves its state
(:class:`GateRun`: gates, Adam's moments, history) in the adapter after every epoch, so a re-run
resumes from the last saved epoch. The gates, tiles and split it builds on are
:mod:`~prismoe_store.gates.gate`, :mod:`~prismoe_store.gates.tiles` and
:mod:`~prismoe_store.gates.heldout`; reports on the result are :mod:`~prismoe_store.gates.report`.
See ``docs/gates.md`` for the choices and their reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np
import torch

from prismoe_store.errors import CorruptStoreError, DataError, FitError, PrismoeError
from prismoe_store.gates.gate import Gates, gated_forward, init_gates
from prismoe_store.gates.heldout import (
    Progress,
    Split,
    heldout_metrics,
    open_stores,
    resolve_split,
    sample_training_rows,
)
from prismoe_store.gates.routing import balance_loss, z_loss
from prismoe_store.gates.settings import DEFAULT_MAX_TILE_BYTES, GateSettings
from prismoe_store.gates.tiles import FrozenTiles, torch_device
from prismoe_store.stores.adapter import RETRAIN_GATES, AdapterStore
from prismoe_store.stores.pairs import PairsStore
from prismoe_store.stores.records import GatesRecord, SplitRecord
from prismoe_store.stores.training_state import STATE_GROUP, load_state, save_state, state_meta


def _loss(tiles, gates, x, z, s: GateSettings, z_scale: float) -> torch.Tensor:
    y, routings = gated_forward(tiles, gates, x, sparsity=s.sparsity, temperature=s.temperature)
    loss = torch.nn.functional.mse_loss(y, z) / z_scale
    if s.balance_coef:
        loss = loss + s.balance_coef * sum(balance_loss(r) for r in routings) / len(routings)
    if s.z_loss_coef:
        loss = loss + s.z_loss_coef * sum(z_loss(r) for r in routings) / len(routings)
    return loss


def _epoch(tiles, gates, opt, pairs, split, s: GateSettings, epoch: int, z_scale: float, tick) -> float:
    """One pass over the training rows in a seeded shuffled block order; returns the mean loss."""
    assert s.seed is not None, "the settings are resolved against the split (seed filled in) before training"
    rng = np.random.default_rng([s.seed, epoch, 11])
    blocks = split.blocks(pairs)
    total, n = 0.0, 0
    for bi in rng.permutation(len(blocks)):
        x, z = split.read(pairs, *blocks[bi], heldout=False)
        perm = rng.permutation(len(x))
        for i in range(0, len(x), s.batch_size):
            idx = perm[i:i + s.batch_size]
            xb = torch.from_numpy(x[idx]).to(tiles.device)
            zb = torch.from_numpy(z[idx]).to(tiles.device)
            loss = _loss(tiles, gates, xb, zb, s, z_scale)
            if not torch.isfinite(loss):
                raise FitError(f"gate training diverged in epoch {epoch} (loss {float(loss.detach())}): lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
            tick(len(idx))
    return total / max(n, 1)


class GateRun:
    """One gate-training run: gates, optimizer, history, best gate, early-stopping counter.

    :meth:`record` evaluates on the held-out rows (epoch 0: before training), :meth:`train` runs
    the epochs left, calling ``on_epoch(improved)`` after each; :meth:`state_arrays`,
    :meth:`state_meta` and :meth:`load_state` are what :func:`fit_gates` saves and resumes.
    ``best_gates`` holds the exported gate of the best epoch so far.
    """

    def __init__(self, tiles: FrozenTiles, pairs: PairsStore, split: Split, s: GateSettings, *,
                 gates: Gates, z_scale: float, max_eval_rows: int | None):
        self.tiles, self.pairs, self.split, self.s = tiles, pairs, split, s
        self.gates = gates  # the gates being trained
        self.opt = torch.optim.Adam(gates.parameters(), lr=s.lr)
        self.z_scale = z_scale  # mean z² of the init sample: makes the MSE term scale-free
        self.max_eval_rows = max_eval_rows  # cap on held-out rows per evaluation
        self.epoch = 0  # epochs finished
        self.history: list[dict] = []  # per epoch: epoch, train_loss, rel_err, r2
        self.best = {"epoch": 0, "rel_err": float("inf"), "r2": float("nan")}
        self.best_gates = [(w.copy(), b.copy()) for w, b in gates.export()]
        self.bad_epochs = 0  # epochs since the best
        self.stopped = False  # early-stopped

    def evaluate(self) -> dict:
        f = lambda x: gated_forward(self.tiles, self.gates, x, sparsity=self.s.sparsity,  # noqa: E731
                                    temperature=self.s.temperature)[0]
        return heldout_metrics(self.pairs, self.split, {"g": f}, device=self.tiles.device,
                               max_rows=self.max_eval_rows)["g"]

    def record(self, train_loss: float | None) -> bool:
        """Evaluate after an epoch; True when this is a new best (the best gate is kept)."""
        m = self.evaluate()
        self.history.append({"epoch": self.epoch, "train_loss": train_loss, "rel_err": m["rel_err"], "r2": m["r2"]})
        if m["rel_err"] < self.best["rel_err"] * (1 - 1e-6):
            self.best = {"epoch": self.epoch, "rel_err": m["rel_err"], "r2": m["r2"]}
            self.best_gates = self.gates.export()
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.s.patience > 0
        return False

    def train(self, progress: Progress | None, on_epoch: Callable[[bool], None] | None = None) -> None:
        n_train = self.split.counts(self.pairs)[0]
        total = max(0, self.s.epochs - self.epoch) * n_train
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress(done[0], total)

        if total:
            tick(0)  # the bar starts before the first batch, so its time covers every batch
        while self.epoch < self.s.epochs and not self.stopped:
            loss = _epoch(self.tiles, self.gates, self.opt, self.pairs, self.split, self.s, self.epoch + 1,
                          self.z_scale, tick)
            self.epoch += 1
            improved = self.record(loss)
            if on_epoch:
                on_epoch(improved)

    # -- persistence (the adapter's _gates_training group, two slots written alternately) --
    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.gates.mean.cpu().numpy(), "scale": self.gates.scale.cpu().numpy()}
        params = list(self.gates.parameters())
        for i, prm in enumerate(params):
            out[f"param{i}"] = prm.detach().cpu().numpy()
            st = self.opt.state.get(prm, {})
            if st:
                out[f"adam{i}_m"] = st["exp_avg"].cpu().numpy()
                out[f"adam{i}_v"] = st["exp_avg_sq"].cpu().numpy()
        return out

    def state_meta(self) -> dict:
        steps = [float(self.opt.state[p]["step"]) for p in self.gates.parameters() if p in self.opt.state]
        return {"epoch": self.epoch, "step": int(steps[0]) if steps else 0, "history": self.history,
                "best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped, "z_scale": self.z_scale}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        dev = self.tiles.device
        with torch.no_grad():
            self.gates.mean.copy_(torch.from_numpy(arrays["mean"]))
            self.gates.scale.copy_(torch.from_numpy(arrays["scale"]))
            params = list(self.gates.parameters())
            for i, prm in enumerate(params):
                prm.copy_(torch.from_numpy(arrays[f"param{i}"]))
        if meta["step"]:
            state = {i: {"step": torch.tensor(float(meta["step"])),
                         "exp_avg": torch.from_numpy(arrays[f"adam{i}_m"]).to(dev),
                         "exp_avg_sq": torch.from_numpy(arrays[f"adam{i}_v"]).to(dev)} for i in range(len(params))}
            self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        self.epoch, self.history, self.best = int(meta["epoch"]), list(meta["history"]), dict(meta["best"])
        self.bad_epochs, self.stopped = int(meta["bad_epochs"]), bool(meta["stopped"])
        self.z_scale = float(meta["z_scale"])


def _save_state(adapter: AdapterStore, run: GateRun, settings: GateSettings, split: Split) -> None:
    """Write the run's state (:func:`~prismoe_store.stores.training_state.save_state`)."""
    save_state(adapter, run.state_arrays(), {"settings": settings.resume_key(), "split": asdict(split),
                                             **run.state_meta()})


def saved_run(adapter: AdapterStore) -> dict | None:
    """``{"epoch", "epochs", "finished", "stopped"}`` of the gate training saved in ``adapter`` (epochs
    done, the run's target, whether it reached it or stopped early), or ``None``; reads attributes only."""
    attrs = state_meta(adapter)
    if attrs is None:
        return None
    record = adapter.gates_record()
    epoch = int(attrs["epoch"])
    epochs = int(record.settings.get("epochs", epoch)) if record is not None else epoch
    stopped = bool(attrs.get("stopped"))
    return {"epoch": epoch, "epochs": epochs, "finished": epoch >= epochs or stopped, "stopped": stopped}


def fit_gates(adapter, pairs, config: GateSettings = GateSettings(),  # noqa: B008 (frozen: a shared default is safe)
              *, restart: bool = False, device="cpu",
              max_tile_bytes: int = DEFAULT_MAX_TILE_BYTES, max_eval_rows: int | None = None,
              progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train every pipe's gate on the frozen tiles and write it into the adapter store.

    ``adapter`` and ``pairs`` are stores or paths; ``config`` says how to train (its ``holdout``
    and ``seed`` left ``None`` take the adapter fit's split). Minibatches stream from the pairs
    store's training rows; the held-out rows (the seeded split, see :func:`resolve_split`) decide
    early stopping, and the gate with the lowest held-out error is written
    (:meth:`AdapterStore.write_gate`) with the settings and metrics in ``attrs["gates"]``. After
    every epoch the gates, Adam's state and the epoch are saved in the adapter, so a re-run resumes
    from the last saved epoch (``restart=True`` starts over; changed settings other than
    ``epochs``/``patience`` require it). ``device``: where training runs; ``max_tile_bytes``: the
    memory budget of the tiles (held whole) and one minibatch's intermediates; ``max_eval_rows``:
    a cap on held-out rows per evaluation; ``progress(done, total)`` counts training rows; ``log``
    hears one line when a saved run is resumed or continued (once its settings are checked).
    Returns a summary dict. Raises :class:`~prismoe_store.errors.DataError` (mismatched stores, a
    budget exceeded, a saved run with other settings), :class:`~prismoe_store.errors.FitError`
    (divergence; the stored gates are then kept).

    >>> import numpy as np
    >>> from prismoe_store.fit import FitConfig, fit
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 8)).astype(np.float32)
    >>> p = PairsStore.create("memory://doc-gates-fit-p", d_in=8, d_out=4, overwrite=True)
    >>> _ = p.append(x, x @ rng.normal(size=(8, 4)).astype(np.float32))
    >>> a = fit(p, "memory://doc-gates-fit-a", FitConfig(workers=4), scheduler="synchronous", overwrite=True)
    >>> r = fit_gates(a, p, GateSettings(sparsity=0.5, epochs=1))
    >>> r["epochs_run"], a.read_gate(0)[0].shape, a.attrs()["gates"]["complete"]
    (1, (4, 8), True)
    """
    if not isinstance(config, GateSettings):
        raise DataError(f"config must be a GateSettings, got {type(config).__name__}")
    adapter, pairs = open_stores(adapter, pairs, write=True)
    with adapter.keeping_gates():  # a run that fails puts the gates it replaced back
        try:
            return _fit_gates(adapter, pairs, config, restart=restart, device=device, max_tile_bytes=max_tile_bytes,
                              max_eval_rows=max_eval_rows, progress=progress, log=log)
        except PrismoeError:
            if restart and STATE_GROUP in adapter.group:  # its state goes with its gates: nothing resumes it
                del adapter.group[STATE_GROUP]
            raise


def _fit_gates(adapter: AdapterStore, pairs: PairsStore, config: GateSettings, *, restart, device, max_tile_bytes,
               max_eval_rows, progress, log=None) -> dict:
    split = resolve_split(adapter, config.holdout, config.seed)
    s = replace(config, holdout=split.holdout, seed=split.seed)
    dev = torch_device(device)
    tiles = FrozenTiles.load(adapter, device=dev, max_bytes=max_tile_bytes)
    tiles.check_batch(s.batch_size, max_tile_bytes)

    saved = None if restart else load_state(adapter, "gate-training state")
    if saved is not None and saved[0].get("settings") != s.resume_key():
        diff = sorted(k for k, v in s.resume_key().items() if saved[0].get("settings", {}).get(k) != v)
        named = ", ".join(k if k.startswith("init_") else "--" + k.replace("_", "-") for k in diff)  # as flags
        raise DataError(f"saved gate training used other settings ({named}): pass --restart to start over")
    before_run = saved_run(adapter) if saved is not None else None
    # a saved run's gates are read whole before anything is written (a lost or damaged one is refused:
    # --restart trains it again); this is also the check of a finished run's no-op
    stored = [] if saved is None else [_saved_gate(adapter, p) for p in range(adapter.n_pipes)]
    if log is not None and before_run is not None and before_run["epoch"] < s.epochs and not before_run["stopped"]:
        log(f"{'continuing' if before_run['finished'] else 'resuming'} from epoch {before_run['epoch']} to {s.epochs}")
    adapter.update_attrs(gates=GatesRecord(asdict(s), False, SplitRecord(**asdict(split))).to_dict())

    if saved is not None:
        meta, arrays = saved
        run = GateRun(tiles, pairs, split, s, gates=Gates.zeros(tiles.grids, tiles.d_in).to(dev),
                      z_scale=float(meta["z_scale"]), max_eval_rows=max_eval_rows)
        run.load_state(arrays, meta)
        run.best_gates = stored
        resumed_from = run.epoch
        before = meta.get("before") or {}
    else:
        xs, zs = sample_training_rows(pairs, split, s.init_rows, split.seed)  # s.seed is split.seed
        x0 = torch.from_numpy(xs).to(dev)
        z_scale = float(np.mean(np.square(zs, dtype=np.float64))) or 1.0
        gates = init_gates(tiles, x0, torch.from_numpy(zs).to(dev), kind=s.init, scale=s.init_scale)
        run = GateRun(tiles, pairs, split, s, gates=gates, z_scale=z_scale, max_eval_rows=max_eval_rows)
        before = _before(tiles, gates, pairs, split, s, dev, max_eval_rows)
        run.record(None)  # epoch 0: the initialised gate
        _write_gates(adapter, run.best_gates)
        _save_state(adapter, run, s, split)
        adapter.group[STATE_GROUP].attrs["before"] = before
        resumed_from = None

    def on_epoch(improved: bool) -> None:
        if improved:
            _write_gates(adapter, run.best_gates)
        _save_state(adapter, run, s, split)

    run.train(progress, on_epoch)
    status = "trained" if resumed_from is None else "already finished" if run.epoch == resumed_from else "resumed"
    summary = {"status": status, "sparsity": s.sparsity, "k": [s.k(g.active_count) for g in tiles.grids],
               "epochs_run": run.epoch, "best_epoch": run.best["epoch"], "stopped_early": run.stopped,
               "resumed_from": resumed_from,
               "heldout_rows": split.counts(pairs)[1] if max_eval_rows is None else max_eval_rows,
               "before": before, "after": {"rel_err": run.best["rel_err"], "r2": run.best["r2"]},
               "history": run.history, "split": asdict(split)}
    adapter.update_attrs(gates=GatesRecord(asdict(s), True, SplitRecord(**asdict(split)),
                                           {k: summary[k] for k in ("before", "after", "best_epoch", "epochs_run",
                                                                    "stopped_early")}).to_dict())
    return summary


def _saved_gate(adapter: AdapterStore, pipe: int) -> tuple[np.ndarray, np.ndarray]:
    """A pipe's stored gate, which a saved run always has (its first epoch-0 write comes before the
    state); missing or damaged: :class:`~prismoe_store.errors.CorruptStoreError` naming the repair."""
    gate = adapter.read_gate(pipe)
    if gate is None:
        raise CorruptStoreError(f"the gate of pipe {pipe + 1} (missing) in {adapter.url}, whose gate training was "
                                f"saved at epoch {adapter.group[STATE_GROUP].attrs.get('epoch')}: {RETRAIN_GATES}")
    return gate


def _write_gates(adapter: AdapterStore, gates: list[tuple[np.ndarray, np.ndarray]]) -> None:
    if not all(np.isfinite(w).all() and np.isfinite(b).all() for w, b in gates):
        raise FitError("gate training produced NaN/Inf gates (NaN/Inf in the pairs, or too high --lr): "
                       "the stored gates are kept")
    for p, (w, b) in enumerate(gates):
        adapter.write_gate(p, w, b)


def _before(tiles, gates, pairs, split, s: GateSettings, dev, max_rows) -> dict:
    """Held-out error of the zero gate, the initialised gate and the dense adapter at the training ρ."""
    zero = Gates.zeros(tiles.grids, tiles.d_in).to(dev)
    f = {"zero": lambda x: gated_forward(tiles, zero, x, sparsity=s.sparsity, temperature=s.temperature)[0],
         "init": lambda x: gated_forward(tiles, gates, x, sparsity=s.sparsity, temperature=s.temperature)[0],
         "dense": tiles.dense}
    return heldout_metrics(pairs, split, f, device=dev, max_rows=max_rows)


def best_epoch_text(epoch: int, last: int | None = None) -> str:
    """How a summary names the epoch whose gate was kept (``last``: the last epoch run); epoch 0 is
    the starting gate, and a best last epoch means the gate was still improving.

    >>> best_epoch_text(0)
    'best epoch 0 (the starting gate: no epoch beat it on the held-out rows, so it is kept)'
    >>> best_epoch_text(2, last=2)
    'best epoch 2 (the last: still improving, a larger --epochs continues it)'
    """
    if epoch == 0:
        return "best epoch 0 (the starting gate: no epoch beat it on the held-out rows, so it is kept)"
    return f"best epoch {epoch}" + (" (the last: still improving, a larger --epochs continues it)"
                                    if epoch == last else "")


def format_fit_gates(summary: dict) -> str:
    """Text of :func:`fit_gates`'s summary: the run, then held-out error of the zero, init and trained
    gates beside the dense adapter.

    >>> m = {"rel_err": 0.5, "r2": 0.75}
    >>> print(format_fit_gates({"resumed_from": None, "sparsity": 0.5, "k": [2], "epochs_run": 2, "best_epoch": 1,
    ...                         "stopped_early": False, "heldout_rows": 9,
    ...                         "before": {"zero": m, "init": m, "dense": m}, "after": m}))
    ρ = 0.5 (K = 2 per pipe), 2 epochs, best epoch 1, 9 held-out rows
    held-out           rel. error       R²
    zero gate              0.5000   0.7500
    init gate              0.5000   0.7500
    trained gate           0.5000   0.7500
    dense (ρ=1)            0.5000   0.7500
    """
    r = summary
    lines = [f"resumed from epoch {r['resumed_from']}"] if r.get("status") == "resumed" else []
    b, a = r["before"], r["after"]
    lines.append(f"ρ = {r['sparsity']} (K = {', '.join(map(str, r['k']))} per pipe), {r['epochs_run']} epoch"
                 f"{'s' * (r['epochs_run'] != 1)}"
                 f"{' (stopped early)' if r['stopped_early'] else ''}, "
                 f"{best_epoch_text(r['best_epoch'], r['epochs_run'])}, "
                 f"{r['heldout_rows']} held-out rows")
    lines.append(f"{'held-out':<18}{'rel. error':>11}{'R²':>9}")
    rows = (("zero gate", b["zero"]), ("init gate", b["init"]), ("trained gate", a), ("dense (ρ=1)", b["dense"]))
    for name, m in rows:
        lines.append(f"{name:<18}{m['rel_err']:>11.4f}{m['r2']:>9.4f}")
    return "\n".join(lines)
