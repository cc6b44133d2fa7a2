"""Train a head adapter's band gate from hidden states alone (``prismoe fit-gates`` on a head).

The gate scores bands, ``s = x W_gᵀ + b_g`` ``[B, n]``; the runtime computes the bands with the
highest scores. It is trained to predict where the head's probability mass lies — knowledge
distillation of the **band-mass distribution** (DESIGN §8)::

    p_b(x) = Σ_{v ∈ band b} softmax(x Wᵀ)_v          loss = − Σ_b p_b log softmax(s)_b

(the cross-entropy of the gate's softmax against ``p``, i.e. KL(p ‖ q) up to a constant). The
targets come from the tiles themselves: one **teacher pass** streams the hidden states through
all bands (in groups that fit the tile cache) and writes, per row, ``log p`` ``[n]`` (float16)
and the band of the top-1 token to a scratch file — nothing vocabulary-sized is stored. Epochs
then stream row blocks of that file in a seeded random order, shuffled within a block; memory
holds one block. A seeded share of the rows is held out: after every epoch the gate is scored
there (top-1 agreement at ρ = the share of bands a token takes: is the winning token's band
among the gate's top ``ceil(ρ·n)``? and the predicted mass kept), and the best epoch's gate is
the one stored. A gate that is not finite is never stored.

>>> import numpy as np, tempfile, os
>>> from prismoe_store.head.build import HeadConfig, build_head
>>> from prismoe_store.stores.adapter import AdapterStore
>>> d = tempfile.mkdtemp(); rng = np.random.default_rng(0)
>>> np.save(os.path.join(d, "w.npy"), rng.normal(size=(256, 16)).astype(np.float32))
>>> np.save(os.path.join(d, "h.npy"), rng.normal(size=(600, 16)).astype(np.float32))
>>> _ = build_head(os.path.join(d, "w.npy"), os.path.join(d, "a.zarr"), config=HeadConfig(band_rows=8))
>>> rep = fit_band_gate(AdapterStore.open(os.path.join(d, "a.zarr"), "r+"), os.path.join(d, "h.npy"),
...                     config=BandGateConfig(epochs=3, sparsity=0.25))
>>> rep.after["top1"] >= rep.before["top1"]
True
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from prismoe_store.errors import DataError, FitError, IncompleteStoreError
from prismoe_store.gates.settings import BAND_GATE
from prismoe_store.grid import band_sizes
from prismoe_store.runtime.slot_pool import SlotPool
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import holdout_mask, open_rows
from prismoe_store.stores.records import GatesRecord
from prismoe_store.stores.training_state import load_state, save_state

ProgressFn = Callable[[int, int], None]
Stages = Callable[[str], AbstractContextManager[ProgressFn | None]]
BLOCK_ROWS = 8192  # rows per streamed block (teacher pass and epochs)


@dataclass(frozen=True)
class BandGateConfig:
    """How the band gate is trained.

    >>> BandGateConfig(lr=0)
    Traceback (most recent call last):
    ...
    prismoe_store.errors.DataError: lr must be a positive number, got 0
    """

    epochs: int = BAND_GATE.epochs  # most passes over the training rows (the best held-out epoch is kept)
    batch_size: int = BAND_GATE.batch_size  # rows per optimizer step
    lr: float = BAND_GATE.lr  # Adam learning rate
    sparsity: float = BAND_GATE.sparsity  # ρ: share of bands a token takes, for the held-out score (and the runtime)
    holdout: float = BAND_GATE.holdout  # share of rows held out to choose the best epoch
    seed: int = BAND_GATE.seed  # the held-out split and the shuffling
    restart: bool = False  # start from the centroid gate instead of the stored gate
    device: str = "cpu"  # where the teacher pass and the training run
    cache_bytes: int | None = None  # tile budget of the teacher pass (None: every band)
    max_rows: int | None = None  # use at most this many hidden-state rows (None: all)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name != "batch_size" else 1):
                raise DataError(f"{name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise DataError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 < self.sparsity <= 1:
            raise DataError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if not 0 <= self.holdout < 1:
            raise DataError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.max_rows is not None and self.max_rows < 1:
            raise DataError(f"max_rows must be positive, got {self.max_rows}")


@dataclass(frozen=True)
class BandGateReport:
    """What :func:`fit_band_gate` did: held-out scores before and after, per epoch."""

    rows: int  # hidden-state rows used (train + held out)
    held_out: int  # rows held out
    epochs: int  # epochs run
    best_epoch: int  # the epoch whose gate was stored (0: the starting gate was best)
    before: dict  # held-out {"top1", "mass", "loss"} of the starting gate
    after: dict  # held-out scores of the stored gate
    history: list  # per epoch: {"epoch", "loss", "top1", "mass"}
    teacher_seconds: float  # the teacher pass
    seconds_per_epoch: float  # mean wall time of an epoch
    settings: dict  # the config
    status: str = "trained"  # "trained", "resumed" (a saved run continued) or "already finished" (nothing done)
    resumed_from: int | None = None  # the saved run's epoch this run started from (None: a new run)

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


def fit_band_gate(adapter: AdapterStore, hidden, *, config: BandGateConfig = BandGateConfig(),
                  stages: Stages | None = None, log: Callable[[str], None] | None = None) -> BandGateReport:
    """Train ``adapter``'s band gate on the hidden states ``hidden`` (see the module docstring).

    ``hidden`` is a pairs store (its ``x``; a hidden-states-only store from ``prismoe collect
    --target none``), a path to one, or a ``.npy`` ``[S, d]``. After every epoch the run's state is
    saved (:mod:`~prismoe_store.stores.training_state`) and the best gate so far stored, so a re-run
    with the same settings resumes from the last finished epoch; a finished run is a no-op
    (``status`` "already finished", no teacher pass), a larger ``epochs`` continues it, and other
    settings (or other hidden states) are refused unless ``restart``; ``log`` hears one line when a
    saved run is resumed or continued. Raises :class:`DataError`
    for a width mismatch, non-finite hidden states or a saved run with other settings,
    :class:`FitError` when training diverges (the best gate so far stays stored).
    """
    stage = stages or (lambda name: contextlib.nullcontext(None))
    if not adapter.complete:
        raise IncompleteStoreError(f"head adapter {adapter.url} is not finished: re-run `prismoe head` first")
    rows_of, S = open_rows(hidden, adapter.d_in, config.max_rows)
    key = resume_key(config, S, hidden)
    # restart: the first epoch overwrites the saved state
    saved = None if config.restart else load_state(adapter, "band-gate training state")
    if saved is not None and saved[0].get("settings") != key:
        old = saved[0].get("settings") or {}
        diff = sorted(k for k in set(key) | set(old) if old.get(k) != key.get(k))
        flags = ", ".join(RESUME_FLAGS.get(k, k) for k in diff)
        raise DataError(f"saved band-gate training used other settings ({flags}): pass --restart to start over")
    held = holdout_mask(config.seed, 0, S, config.holdout) if config.holdout > 0 else np.zeros(S, bool)
    if held.all() or (~held).sum() < 1:
        raise DataError(f"{S} rows leave nothing to train on with holdout {config.holdout}")
    if saved is not None and saved[0]["epoch"] >= config.epochs:  # finished: nothing to do, no teacher pass
        adapter.read_band_gate()  # ... once the gate it claims is read back whole (else: --restart, it says)
        record = adapter.gates_record()
        return _report(saved[0], rows=S, held_out=int(held.sum()), status="already finished",
                       settings=record.settings if record else {}, resumed_from=int(saved[0]["epoch"]))
    if saved is not None and log is not None:
        what = "continuing" if saved[0]["epoch"] >= saved[0].get("epochs", 0) else "resuming"
        log(f"{what} from epoch {saved[0]['epoch']} to {config.epochs}")
    device = torch.device(config.device)
    n = adapter.n_bands
    k = max(1, math.ceil(config.sparsity * n))
    if saved is None:
        from prismoe_store.head.build import centroid_gate, stored_band_gate

        gate = None if config.restart else stored_band_gate(adapter)
        if gate is None:

            gate = centroid_gate(adapter)
        arrays = {"weight": gate[0], "bias": gate[1]}
    else:
        arrays = saved[1]
    weight = torch.nn.Parameter(torch.as_tensor(arrays["weight"], device=device).clone())  # [n, d]
    bias = torch.nn.Parameter(torch.as_tensor(arrays["bias"], device=device).clone())  # [n]
    opt = torch.optim.Adam([weight, bias], lr=config.lr)
    meta = dict(saved[0]) if saved is not None else {}
    if meta.get("step"):
        opt.load_state_dict({"state": {i: {"step": torch.tensor(float(meta["step"])),
                                           "exp_avg": torch.as_tensor(arrays[f"m{i}"], device=device),
                                           "exp_avg_sq": torch.as_tensor(arrays[f"v{i}"], device=device)}
                                       for i in range(2)},
                             "param_groups": opt.state_dict()["param_groups"]})
    settings = {**asdict(config), "kind": "band-mass distillation"}

    with tempfile.TemporaryDirectory(prefix="prismoe-gate-") as scratch:
        t0 = time.perf_counter()
        with stage("teacher pass") as progress:
            targets = _Targets(os.path.join(scratch, "targets"), S, n)
            _teacher_pass(adapter, rows_of, targets, device, config.cache_bytes, progress)
        teacher_seconds = time.perf_counter() - t0
        train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
        score = lambda: _score(weight, bias, rows_of, targets, held_rows, k, device)  # noqa: E731
        if saved is None:
            before = score()
            meta = {"settings": key, "epoch": 0, "step": 0, "history": [], "before": before,
                    "best": {"epoch": 0, "top1": before["top1"], "mass": before["mass"], "loss": before["loss"]}}
            best_w, best_b = weight.detach().clone(), bias.detach().clone()
        else:
            best_w = torch.as_tensor(arrays["best_weight"], device=device).clone()
            best_b = torch.as_tensor(arrays["best_bias"], device=device).clone()
        status = "trained" if saved is None else "resumed"
        adapter.update_attrs(gates=GatesRecord(settings, complete=False).to_dict())
        meta["epochs"] = config.epochs
        epoch_seconds = []
        with stage("gate epochs") as progress:
            if progress:  # the bar starts with the first epoch, so its time is every epoch's
                progress(int(meta["epoch"]), config.epochs)
            for epoch in range(int(meta["epoch"]) + 1, config.epochs + 1):
                t1 = time.perf_counter()
                rng = np.random.default_rng([config.seed, epoch])  # the order depends on seed and epoch only
                loss = _epoch(weight, bias, opt, rows_of, targets, train_rows, config.batch_size, rng, device)
                if not math.isfinite(loss) or not bool(torch.isfinite(weight).all()):
                    raise FitError(f"gate training diverged at epoch {epoch} (loss {loss}): lower --lr; "
                                   "the best gate so far stays stored")
                s = score()
                meta["history"] = [*meta["history"], {"epoch": epoch, "loss": loss, **s}]
                epoch_seconds.append(time.perf_counter() - t1)
                if (s["top1"], s["mass"]) > (meta["best"]["top1"], meta["best"]["mass"]):
                    meta["best"] = {"epoch": epoch, **s}
                    best_w, best_b = weight.detach().clone(), bias.detach().clone()
                    adapter.write_band_gate(best_w.cpu().numpy(), best_b.cpu().numpy())
                meta["epoch"] = epoch
                meta["step"] = int(opt.state[weight]["step"]) if weight in opt.state else 0
                save_state(adapter, _arrays(weight, bias, opt, best_w, best_b), meta)
                if progress:
                    progress(epoch, config.epochs)
    adapter.write_band_gate(best_w.cpu().numpy(), best_b.cpu().numpy())
    save_state(adapter, _arrays(weight, bias, opt, best_w, best_b), meta)
    adapter.update_attrs(gates=GatesRecord(settings, complete=True, held_out=_after(meta)).to_dict())
    return _report(meta, rows=S, held_out=int(held.sum()), status=status, settings=settings,
                   resumed_from=None if saved is None else int(saved[0]["epoch"]),
                   teacher_seconds=teacher_seconds, epoch_seconds=epoch_seconds)


RESUME_IGNORES = ("epochs", "restart", "device", "cache_bytes")  # settings a resumed run may change
RESUME_FLAGS = {"sparsity": "--sparsity", "lr": "--lr", "batch_size": "--batch-size", "holdout": "--holdout",
                "seed": "--seed", "rows": "the hidden states' rows", "hidden": "the hidden states",
                "max_rows": "max_rows"}


def resume_key(config: BandGateConfig, rows: int, hidden=None) -> dict:
    """The settings a resumed (or finished) run must share with this one: all but ``RESUME_IGNORES``,
    the hidden states (their path or URL) and their number of rows."""
    source = getattr(hidden, "url", hidden)
    if isinstance(source, (str, os.PathLike)) and "://" not in str(source):
        source = os.path.abspath(source)
    source = str(source) if isinstance(source, (str, os.PathLike)) else None
    return {**{k: v for k, v in asdict(config).items() if k not in RESUME_IGNORES}, "rows": rows, "hidden": source}


def _arrays(weight, bias, opt, best_w, best_b) -> dict[str, np.ndarray]:
    out = {"weight": weight.detach().cpu().numpy(), "bias": bias.detach().cpu().numpy(),
           "best_weight": best_w.cpu().numpy(), "best_bias": best_b.cpu().numpy()}
    for i, prm in enumerate((weight, bias)):
        st = opt.state.get(prm, {})
        if st:
            out[f"m{i}"], out[f"v{i}"] = st["exp_avg"].cpu().numpy(), st["exp_avg_sq"].cpu().numpy()
    return out


def _after(meta: dict) -> dict:
    return {key: meta["best"][key] for key in ("top1", "mass", "loss")}


def _report(meta: dict, *, rows: int, held_out: int, status: str, settings: dict, resumed_from: int | None,
            teacher_seconds: float = 0.0, epoch_seconds: list | None = None) -> BandGateReport:
    """The report of a run from its saved record."""
    return BandGateReport(rows=rows, held_out=held_out, epochs=int(meta["epoch"]),
                          best_epoch=int(meta["best"]["epoch"]),
                          before=dict(meta["before"]), after=_after(meta), history=list(meta["history"]),
                          teacher_seconds=teacher_seconds,
                          seconds_per_epoch=float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
                          settings=settings, status=status, resumed_from=resumed_from)


# -- the teacher pass ---------------------------------------------------------------------------


class _Targets:
    """Per row: ``log p`` over bands (float16 ``[S, n]``) and the top-1 token's band (int32 ``[S]``),
    in raw scratch files read back by row ranges."""

    def __init__(self, stem: str, rows: int, bands: int):
        self.logp = np.lib.format.open_memmap(stem + ".logp.npy", "w+", np.float16, (rows, bands))
        self.top = np.lib.format.open_memmap(stem + ".top.npy", "w+", np.int32, (rows,))



def band_log_mass(x: torch.Tensor, pool: SlotPool, n_bands: int, last_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [B, n], top1_band [B])``: per band ``log Σ_{v∈b} exp(x · w_v)`` and the band of the
    top-1 token, through the pool in groups of bands that fit it."""
    B, a = x.shape[0], pool.tile_shape[0]
    lse = torch.empty(B, n_bands, device=x.device)
    best = torch.full((B,), float("-inf"), device=x.device)
    best_band = torch.zeros(B, dtype=torch.int64, device=x.device)
    for start in range(0, n_bands, pool.slots):
        group = np.arange(start, min(n_bands, start + pool.slots))
        slots = pool.acquire(group)
        w = pool.weights(slots)  # [G, d, a] transposed band tiles
        y = torch.bmm(x.expand(len(group), B, x.shape[1]), w).permute(1, 0, 2)  # [B, G, a]
        pool.release()
        if group[-1] == n_bands - 1 and last_rows < a:
            y[:, -1, last_rows:] = float("-inf")  # the short last band's empty rows
        lse[:, group] = torch.logsumexp(y, dim=2)
        m, where = y.reshape(B, -1).max(dim=1)
        better = m > best
        best = torch.where(better, m, best)
        best_band = torch.where(better, torch.as_tensor(group, device=x.device)[where // a], best_band)
    return lse, best_band


def _teacher_pass(adapter: AdapterStore, rows_of, targets: _Targets, device, cache_bytes, progress) -> None:
    last = adapter.d_out - adapter.band_rows * (adapter.n_bands - 1)
    per_band = adapter.band_rows * adapter.d_in * 4
    pool = SlotPool(n_tiles=adapter.n_bands, tile_shape=(adapter.band_rows, adapter.d_in), device=device,
                    budget_bytes=cache_bytes or per_band * adapter.n_bands,
                    tile_rows=band_sizes(adapter.d_out, adapter.band_rows),
                    load=lambda b: (adapter.read_band_tiles(b),))
    S = targets.top.shape[0]
    if progress:
        progress(0, S)  # the bar shows from the start: the first rows take the longest (bands load)
    try:
        with torch.no_grad():
            for start in range(0, S, BLOCK_ROWS):
                stop = min(S, start + BLOCK_ROWS)
                for s in range(start, stop, 1024):
                    x = torch.from_numpy(rows_of(s, min(stop, s + 1024))).to(device)  # [b, d]
                    lse, top = band_log_mass(x, pool, adapter.n_bands, last)
                    targets.logp[s:s + len(x)] = (lse - torch.logsumexp(lse, 1, keepdim=True)).cpu().numpy()
                    targets.top[s:s + len(x)] = top.cpu().numpy()
                    if progress:
                        progress(s + len(x), S)
    finally:
        pool.close()
    targets.logp.flush()
    targets.top.flush()


# -- training -----------------------------------------------------------------------------------


def _blocks(rows: np.ndarray, rng: np.random.Generator | None) -> list[tuple[int, int, np.ndarray]]:
    """``rows`` (sorted) cut into ``(start, stop, local)`` blocks of at most ``BLOCK_ROWS`` source rows
    (``local``: the rows' offsets from ``start``), in random order and shuffled within when ``rng``
    is given. A block is read with one contiguous read."""
    out = []
    for start in range(0, int(rows[-1]) + 1, BLOCK_ROWS):
        inside = rows[(rows >= start) & (rows < start + BLOCK_ROWS)]
        if len(inside):
            out.append((start, int(inside[-1]) + 1, inside - start))
    if rng is not None:
        out = [(a, b, rng.permutation(local)) for a, b, local in (out[i] for i in rng.permutation(len(out)))]
    return out


def _epoch(weight, bias, opt, rows_of, targets: _Targets, train_rows, batch_size: int, rng, device) -> float:
    total, count = 0.0, 0
    for start, stop, local in _blocks(train_rows, rng):
        xb = torch.from_numpy(rows_of(start, stop)[local]).to(device)  # [n_b, d] in shuffled order
        pb = torch.from_numpy(np.asarray(targets.logp[start:stop], np.float32)[local]).exp_().to(device)  # [n_b, n]
        for i in range(0, len(local), batch_size):
            x, p = xb[i:i + batch_size], pb[i:i + batch_size]  # [b, d], [b, n] band-mass targets
            q = torch.log_softmax(torch.addmm(bias, x, weight.T), dim=1)  # [b, n]
            loss = -(p * q).sum(dim=1).mean()  # cross-entropy to the band-mass distribution
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
            count += len(x)
    return total / max(1, count)


@torch.no_grad()
def _score(weight, bias, rows_of, targets: _Targets, rows: np.ndarray, k: int, device) -> dict:
    """Held-out ``top1`` (winning token's band among the gate's top k), ``mass`` (true band mass in
    those k bands) and ``loss``."""
    if not len(rows):
        return {"top1": float("nan"), "mass": float("nan"), "loss": float("nan")}
    hit = mass = loss = 0.0
    for start, stop, local in _blocks(rows, None):
        x = torch.from_numpy(rows_of(start, stop)[local]).to(device)  # [b, d]
        p = torch.from_numpy(np.asarray(targets.logp[start:stop], np.float32)[local]).exp_().to(device)  # [b, n]
        top = torch.from_numpy(np.asarray(targets.top[start:stop])[local]).to(device)  # [b]
        s = torch.addmm(bias, x, weight.T)  # [b, n]
        sel = torch.topk(s, k, dim=1).indices  # [b, k]
        hit += float((sel == top[:, None]).any(dim=1).sum())
        mass += float(torch.gather(p, 1, sel).sum())
        loss += float(-(p * torch.log_softmax(s, dim=1)).sum())
    n = len(rows)
    return {"top1": hit / n, "mass": mass / n, "loss": loss / n}
