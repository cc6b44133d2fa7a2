"""Phase 2: gates trained on frozen tiles.

Each pipe's gate is a linear layer ``s = x W_gᵀ + b_g`` (one score per worker). Routing —
top-k with ``K = round(ρ·n)`` and the ``joint`` / ``independent`` weights — is
:func:`prismoe_store.gates.routing.route`, shared with the runtime. This module adds what training
needs on top of it:

- :class:`FrozenTiles`: every pipe's tiles held in memory as one padded ``[d_out_pad, d_in_pad]``
  tensor (refused above a byte budget: gate training is for adapters whose tiles fit in RAM or
  device memory; streaming tiles is the runtime's job), and the gated pipe product
  ``y_r = Σ_c w_rc · T_rc x_c`` for dense per-token weights ``w [B, R, C]``, differentiable in
  ``w`` (tiles frozen);
- :class:`Gates`: the trainable gates of all pipes, kept in standardized input units so one
  learning rate suits any activation scale, exported as plain ``(W_g, b_g)`` for the store;
- :func:`init_gates`: ``gain`` (the default: a linear least-squares prediction of how much each
  tile alone lowers its band's error, ``2⟨T_j x_c, z_r⟩ − ‖T_j x_c‖²``, so the untrained gate
  already picks useful tiles), ``energy`` (the same for the tile's output norm ``‖T_j x_c‖``) or
  ``zero`` (uniform scores: ties broken by ``torch.topk``, i.e. a fixed arbitrary subset);
- :func:`fit_gates`: Adam on ``MSE(y, z)/mean(z²) + β·balance + γ·z_loss`` over minibatches
  streamed from the pairs store (training rows only: the held-out rows are the fit's seeded
  split), early stopping on held-out error, resumable from the last saved epoch;
- :class:`Split`, :func:`resolve_split` and :func:`heldout_metrics`: the seeded held-out split
  and the streamed relative error / R² on it.

Routing statistics, the quality report, the gate benchmark and their plots are
:mod:`prismoe_store.gates.report`. See ``docs/gates.md`` for the choices and their reasons.

>>> import numpy as np, torch
>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(8, 8, 4)
>>> t = FrozenTiles([torch.randn(g.d_out_pad, g.d_in_pad)], [g], [1.0], "joint")
>>> x = torch.randn(5, 8)
>>> y, _ = gated_forward(t, Gates.zeros([g], 8), x, sparsity=1.0)
>>> bool(torch.allclose(y, x @ t.tiles[0][:8, :8].T, atol=1e-5))
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.errors import DataError, FitError, IncompleteStoreError, PrismoeError, StoreError
from prismoe_store.gates.settings import DEFAULT_MAX_TILE_BYTES, INITS, GateSettings
from prismoe_store.grid import GridSpec
from prismoe_store.stores.pairs import PairsStore, holdout_mask
from prismoe_store.gates.routing import Routing, active_mask, balance_loss, route, z_loss
from prismoe_store.stores.formats import create_chunked
from prismoe_store.stores.verified import reading
from prismoe_store.stores.records import GatesRecord, SplitRecord

Progress = Callable[[int, int], None]
WORK_BYTES = 128 << 20  # bytes of per-tile partial products computed at a time (statistics, init)
_STATE = "_gates_training"  # adapter group holding the resumable training state


# -- frozen tiles and the gated product --------------------------------------------------------


class FrozenTiles:
    """All pipes' tiles in memory (one padded tensor per pipe), with the gated pipe product.

    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(4, 4, 4)
    >>> t = FrozenTiles([torch.eye(g.d_out_pad, g.d_in_pad)], [g], [1.0], "joint")
    >>> t.product(0, t.pad(torch.ones(1, 4)), torch.ones(1, g.rows, g.cols)).shape
    torch.Size([1, 4])
    """

    def __init__(self, tiles: Sequence[torch.Tensor], grids: Sequence[GridSpec], alphas: Sequence[float],
                 mode: str):
        if mode not in ("joint", "independent"):
            raise DataError(f"mode must be 'joint' or 'independent', got {mode!r}")
        if not (len(tiles) == len(grids) == len(alphas)) or not grids:
            raise DataError("need one tile tensor, grid and alpha per pipe")
        for t, g in zip(tiles, grids):
            if tuple(t.shape) != g.padded_shape:
                raise DataError(f"tiles must be {g.padded_shape}, got {tuple(t.shape)}")
        self.tiles = [t.float() for t in tiles]  # per pipe: float32 [d_out_pad, d_in_pad], frozen
        self.grids = list(grids)  # per pipe: its grid
        self.alphas = [float(a) for a in alphas]  # pipe weights α (sum 1)
        self.mode = mode  # "joint" or "independent": how gate weights combine tiles
        self.d_in, self.d_out = grids[0].d_in, grids[0].d_out

    @classmethod
    def load(cls, adapter: AdapterStore, *, device="cpu", max_bytes: int = DEFAULT_MAX_TILE_BYTES) -> "FrozenTiles":
        """Read every pipe's tiles into memory on ``device``; refuse when they exceed ``max_bytes``.

        >>> from prismoe_store.grid import plan_grid
        >>> a = AdapterStore.create("memory://doc-gates-load", grids=[plan_grid(4, 4, 4)], overwrite=True)
        >>> FrozenTiles.load(a).tiles[0].shape
        torch.Size([4, 4])
        """
        need = sum(g.d_out_pad * g.d_in_pad * 4 for g in adapter.grids)
        if need > max_bytes:
            raise DataError(
                f"the adapter's tiles take {need / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB that gate "
                "training may hold in memory (raise --max-tile-mb; tiles are held whole, not streamed)")
        tiles = []
        for p in range(adapter.n_pipes):
            with reading(f"tiles of pipe {p} in {adapter.url}"):
                tiles.append(torch.from_numpy(np.asarray(adapter.tiles(p)[...], np.float32)).to(device))
        return cls(tiles, adapter.grids, adapter.alphas, adapter.mode)

    @property
    def device(self) -> torch.device:
        """Where the tiles live."""
        return self.tiles[0].device

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, d_in]`` zero-padded to the widest pipe input ``[B, max d_in_pad]``."""
        width = max(g.d_in_pad for g in self.grids)
        return torch.nn.functional.pad(x.float(), (0, width - x.shape[1]))

    def product(self, pipe: int, xpad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``y [B, d_out]`` with band ``r`` = ``Σ_c w[:, r, c] · T_rc x_c`` (``w [B, R, C]``).

        Computed as one batched product per band (``T_r`` times the weighted, slice-expanded
        input) or per slice (all of slice ``c``'s partial products, then weighted), whichever
        holds the smaller intermediate; both are exact and differentiable in ``w``.
        """
        g, T = self.grids[pipe], self.tiles[pipe]
        n, R, C, a, b = xpad.shape[0], g.rows, g.cols, g.tile_out, g.tile_in
        xs = xpad[:, : g.d_in_pad].reshape(n, C, b)
        if b <= a:  # intermediate [R, C*b, n]
            xw = (w.reshape(n, R, C, 1) * xs.reshape(n, 1, C, b)).reshape(n, R, C * b).permute(1, 2, 0)
            y = torch.bmm(T.reshape(R, a, C * b), xw)  # [R, a, n]
            y = y.permute(2, 0, 1).reshape(n, R * a)
        else:  # intermediate [C, n, R*a]
            part = self._partials(pipe, xs)  # [C, n, R, a]
            y = (part * w.permute(2, 0, 1).reshape(C, n, R, 1)).sum(0).reshape(n, R * a)
        return y[:, : self.d_out]

    def _partials(self, pipe: int, xs: torch.Tensor) -> torch.Tensor:
        """``[C, n, R, a]``: every tile's product ``T_rc x_c`` for ``xs [n, C, b]``."""
        g, T = self.grids[pipe], self.tiles[pipe]
        R, C, a, b = g.rows, g.cols, g.tile_out, g.tile_in
        tc = T.reshape(R * a, C, b).permute(1, 2, 0)  # [C, b, R*a] (a view)
        return torch.bmm(xs.permute(1, 0, 2), tc).reshape(C, xs.shape[0], R, a)

    def energies(self, pipe: int, xpad: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, workers]`` per token: each tile's output energy ``‖T_j x_c‖²``, or with a target
        ``z [B, d_out]`` its *gain* ``‖z_r‖² − ‖z_r − T_j x_c‖² = 2⟨T_j x_c, z_r⟩ − ‖T_j x_c‖²`` (how
        much the tile alone lowers its band's squared error). Computed in bounded chunks.
        """
        g = self.grids[pipe]
        step = max(1, WORK_BYTES // (4 * g.d_out_pad * g.cols))
        out = []
        for i in range(0, xpad.shape[0], step):
            xs = xpad[i:i + step, : g.d_in_pad].reshape(-1, g.cols, g.tile_in)
            part = self._partials(pipe, xs)  # [C, n, R, a]
            e = part.pow(2).sum(-1)  # [C, n, R]
            if z is not None:
                zb = torch.nn.functional.pad(z[i:i + step].float(), (0, g.d_out_pad - self.d_out))
                e = 2 * (part * zb.reshape(1, -1, g.rows, g.tile_out)).sum(-1) - e
            out.append(e.permute(1, 2, 0).reshape(xs.shape[0], g.workers))
        return torch.cat(out) if out else xpad.new_zeros(0, g.workers)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter with every tile used and a uniform gate (ρ = 1): for ``joint`` tiles every weight
        is 1 (the dense ridge solution), for ``independent`` tiles each band averages its live tiles."""
        xpad, y = self.pad(x), 0.0
        for p, g in enumerate(self.grids):
            act = active_mask(g, self.device).reshape(g.rows, g.cols).float()
            w = act if self.mode == "joint" else act / act.sum(1, keepdim=True).clamp_min(1)
            y = y + self.alphas[p] * self.product(p, xpad, w.expand(x.shape[0], -1, -1))
        return y


# -- gates -------------------------------------------------------------------------------------


class Gates(torch.nn.Module):
    """Linear gates of all pipes, in standardized input units.

    Scores are ``s = ((x − μ)/σ̃) Vᵀ + c`` with ``σ̃ = σ·√d_in`` (per-feature mean and standard
    deviation of a training sample), so ``‖(x − μ)/σ̃‖ ≈ 1`` whatever the activation scale and one
    learning rate suits any data. :meth:`export` folds ``μ, σ̃`` into plain ``(W_g, b_g)``.

    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(6, 4, 4)
    >>> gates = Gates([torch.randn(4, 6)], [torch.randn(4)], mean=torch.randn(6), scale=torch.rand(6) + 1)
    >>> W, b = gates.export()[0]
    >>> x = torch.randn(3, 6)
    >>> bool(torch.allclose(gates.scores(0, x), x @ torch.from_numpy(W).T + torch.from_numpy(b), atol=1e-5))
    True
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], *,
                 mean: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        d_in = weights[0].shape[1]
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(w.detach().float().clone()) for w in weights])
        self.biases = torch.nn.ParameterList([torch.nn.Parameter(b.detach().float().clone()) for b in biases])
        self.register_buffer("mean", torch.zeros(d_in) if mean is None else mean.detach().float().clone())
        self.register_buffer("scale", torch.ones(d_in) if scale is None else scale.detach().float().clone())

    @classmethod
    def zeros(cls, grids: Sequence[GridSpec], d_in: int, **kw) -> "Gates":
        """All-zero gates (uniform scores)."""
        return cls([torch.zeros(g.workers, d_in) for g in grids], [torch.zeros(g.workers) for g in grids], **kw)

    @classmethod
    def from_arrays(cls, gates: Sequence[tuple[np.ndarray, np.ndarray]]) -> "Gates":
        """Gates from stored ``(W_g [workers, d_in], b_g [workers])`` per pipe (no standardization)."""
        return cls([torch.from_numpy(np.asarray(w, np.float32)) for w, _ in gates],
                   [torch.from_numpy(np.asarray(b, np.float32)) for _, b in gates])

    @classmethod
    def from_store(cls, adapter: AdapterStore) -> "Gates":
        """The adapter's stored gates; :class:`~prismoe_store.errors.DataError` when it has none."""
        stored = [adapter.read_gate(p) for p in range(adapter.n_pipes)]
        if any(s is None for s in stored):
            raise DataError(f"adapter {adapter.url} has no gates yet: run `prismoe fit-gates` first")
        return cls.from_arrays(stored)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − μ)/σ̃``: the input the gate weights act on."""
        return (x.float() - self.mean) / self.scale

    def scores(self, pipe: int, x: torch.Tensor) -> torch.Tensor:
        """Raw scores ``[B, workers]`` (padding workers not masked)."""
        return self.standardize(x) @ self.weights[pipe].T + self.biases[pipe]

    def export(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per pipe ``(W_g [workers, d_in], b_g [workers])`` float32 acting on raw ``x``."""
        out = []
        with torch.no_grad():
            for V, c in zip(self.weights, self.biases):
                W = V.double() / self.scale.double()
                b = c.double() - W @ self.mean.double()
                out.append((W.float().cpu().numpy(), b.float().cpu().numpy()))
        return out


def gated_forward(tiles: FrozenTiles, gates: Gates, x: torch.Tensor, *, sparsity: float, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, list[Routing]]:
    """The gated adapter ``y = Σ_p α_p y_p`` for ``x [B, d_in]``; returns ``(y [B, d_out], routings)``.

    Top-k selection is discrete; gradients reach the gate through the softmax weights of the
    selected workers (the unselected get none from the MSE, only from the balance loss).

    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(8, 6, 8)
    >>> t = FrozenTiles([torch.randn(*g.padded_shape)], [g], [1.0], "joint")
    >>> y, r = gated_forward(t, Gates.zeros([g], 8), torch.randn(2, 8), sparsity=0.5)
    >>> y.shape, r[0].indices.shape
    (torch.Size([2, 6]), torch.Size([2, 4]))
    """
    xs = gates.standardize(x)
    xpad = tiles.pad(x)
    y, routings = 0.0, []
    for p, g in enumerate(tiles.grids):
        r = route(xs, gates.weights[p], gates.biases[p], grid=g, sparsity=sparsity, mode=tiles.mode,
                  temperature=temperature)
        w = r.dense_weights().reshape(-1, g.rows, g.cols)
        y = y + tiles.alphas[p] * tiles.product(p, xpad, w)
        routings.append(r)
    return y, routings


def init_gates(tiles: FrozenTiles, x: torch.Tensor, z: torch.Tensor | None = None, *, kind: str = "gain",
               scale: float = GateSettings.init_scale) -> Gates:
    """Initial gates from a sample of training rows ``x [S, d_in]`` (and targets ``z [S, d_out]``).

    ``gain`` (default): per pipe, a ridge regression (float64) on the standardized input of each
    tile's *gain* ``2⟨T_j x_c, z_r⟩ − ‖T_j x_c‖²`` (how much that tile alone lowers its band's
    squared error on the token), rescaled so the scores have standard deviation ``scale`` across
    rows and active workers: the init's top-k is the top-k of the predicted gains. ``energy``: the
    same with the tile output norm ``‖T_j x_c‖`` (needs no target). ``zero``: all scores 0 (the
    input standardization is still fitted, for training). A small ``scale`` keeps the initial
    ``K·softmax`` weights ≈ 1, so the init changes which tiles are used, not how much.

    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(8, 8, 4)
    >>> t = FrozenTiles([torch.randn(*g.padded_shape)], [g], [1.0], "joint")
    >>> x = torch.randn(64, 8)
    >>> gates = init_gates(t, x, x @ torch.randn(8, 8), scale=1.0)
    >>> round(float(gates.scores(0, x).detach().std()), 2)
    1.0
    """
    if kind not in INITS:
        raise DataError(f"init must be one of {INITS}, got {kind!r}")
    x = x.float().to(tiles.device)
    if x.shape[0] < 2:
        raise DataError("the gate initialisation needs at least 2 training rows")
    mean = x.mean(0)
    std = x.std(0)
    std = torch.where(std > 1e-12 * (1 + std.max()), std, torch.ones_like(std))
    gscale = std * math.sqrt(tiles.d_in)
    zero = Gates.zeros(tiles.grids, tiles.d_in, mean=mean, scale=gscale).to(tiles.device)
    if kind == "zero":
        return zero
    xs = zero.standardize(x).double()
    A = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype, device=xs.device)], 1)  # [S, M+1]
    G = A.T @ A
    diag = torch.arange(tiles.d_in, device=G.device)
    G[diag, diag] += 1e-3 * float(torch.diagonal(G)[:-1].mean()) + 1e-12  # ridge on the weights, not the bias
    xpad = tiles.pad(x)
    weights, biases = [], []
    for p, g in enumerate(tiles.grids):
        act = active_mask(g, tiles.device)
        if kind == "gain":
            if z is None:
                raise DataError("the 'gain' initialisation needs the targets z of the sample")
            E = tiles.energies(p, xpad, z.float().to(tiles.device)).double()  # [S, W]: per-tile error reduction
        else:
            E = tiles.energies(p, xpad).double().sqrt()  # [S, W]: tile output norms
        theta = torch.linalg.solve(G, A.T @ E)  # [M+1, W]: predicted norm = [xs, 1] θ
        pred = (A @ theta)[:, act]
        mu, sd = float(pred.mean()), float(pred.std())
        if not sd > 1e-9 * (abs(mu) + 1e-30):  # every tile predicted alike: nothing to rank by
            theta.zero_()
        else:
            theta[-1] -= mu
            theta *= scale / sd
        theta[:, ~act] = 0.0
        weights.append(theta[:-1].T.float())
        biases.append(theta[-1].float())
    return Gates(weights, biases, mean=mean, scale=gscale).to(tiles.device)


# -- the held-out split and streaming ---------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """The seeded held-out split of a pairs store's rows (the same one the fit used).

    >>> Split(0.25, 3).mask(0, 8).dtype
    dtype('bool')
    """

    holdout: float  # share of rows held out
    seed: int  # seed of :func:`prismoe_store.stores.pairs.holdout_mask`
    source: str = "options"  # where the values came from: "fit" (the adapter's fit), "options", "default"

    def mask(self, start: int, stop: int) -> np.ndarray:
        """True for held-out rows among ``start:stop``."""
        return holdout_mask(self.seed, start, stop, self.holdout)

    def blocks(self, pairs: PairsStore) -> list[tuple[int, int]]:
        """Row blocks aligned to the store's chunks."""
        rc, n = pairs.rows_per_chunk, pairs.rows
        return [(s, min(s + rc, n)) for s in range(0, n, rc)]

    def read(self, pairs: PairsStore, start: int, stop: int, *, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
        """The held-out (or training) rows of block ``start:stop``."""
        x, z = pairs.read(start, stop)
        keep = self.mask(start, start + len(x))
        keep = keep if heldout else ~keep
        return x[keep], z[keep]

    def counts(self, pairs: PairsStore) -> tuple[int, int]:
        """``(training rows, held-out rows)``."""
        held = int(sum(self.mask(s, e).sum() for s, e in self.blocks(pairs)))
        return pairs.rows - held, held


def resolve_split(adapter: AdapterStore, holdout: float | None = None, seed: int | None = None) -> Split:
    """The held-out split: the adapter fit's (``attrs["fit"]["settings"]``: ``holdout``, ``seed``), else the options.

    Options that differ from the fit's are honoured with a warning: held-out rows the tiles were
    fitted on make the held-out error optimistic.

    >>> from prismoe_store.grid import plan_grid
    >>> a = AdapterStore.create("memory://doc-gates-split", grids=[plan_grid(4, 4, 4)], overwrite=True,
    ...                         attrs={"fit": {"settings": {"holdout": 0.2, "seed": 5}}})
    >>> resolve_split(a)
    Split(holdout=0.2, seed=5, source='fit')
    """
    fit = adapter.fit_record()
    f_hold, f_seed = (fit.holdout, fit.seed) if fit is not None else (None, None)
    if f_hold is not None and f_seed is not None:
        if (holdout is not None and abs(holdout - float(f_hold)) > 1e-12) or (seed is not None and seed != int(f_seed)):
            warnings.warn(f"held-out split ({holdout}, seed {seed}) differs from the fit's ({f_hold}, seed {f_seed}): "
                          "held-out errors will be optimistic", stacklevel=2)
            return Split(float(holdout if holdout is not None else f_hold), int(seed if seed is not None else f_seed))
        return Split(float(f_hold), int(f_seed), "fit")
    if holdout is None and seed is None:
        return Split(0.1, 0, "default")
    return Split(0.1 if holdout is None else float(holdout), 0 if seed is None else int(seed))


def _open(adapter, pairs, *, write: bool = False) -> tuple[AdapterStore, PairsStore]:
    if not isinstance(adapter, AdapterStore):
        adapter = AdapterStore.open(adapter, "r+" if write else "r")
    if not isinstance(pairs, PairsStore):
        pairs = PairsStore.open(pairs)
    if not adapter.complete:
        raise IncompleteStoreError(f"adapter {adapter.url} is not finished: re-run `prismoe fit` to complete it")
    if (pairs.d_in, pairs.d_out) != (adapter.d_in, adapter.d_out):
        raise DataError(f"pairs are {pairs.d_in}→{pairs.d_out} but the adapter maps {adapter.d_in}→{adapter.d_out}")
    if write and adapter.group.read_only:
        raise StoreError(f"adapter {adapter.url} is open read-only: open it with mode 'r+' to write gates")
    return adapter, pairs


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' asked for but CUDA is not available")
    return dev


def _sample_train(pairs: PairsStore, split: Split, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``rows`` training rows from randomly ordered (seeded) blocks."""
    blocks = split.blocks(pairs)
    xs, zs, have = [], [], 0
    for i in np.random.default_rng([seed, 7]).permutation(len(blocks)):
        x, z = split.read(pairs, *blocks[i], heldout=False)
        xs.append(x[: rows - have])
        zs.append(z[: rows - have])
        have += len(xs[-1])
        if have >= rows:
            break
    if have < 2:
        raise DataError(f"{pairs.url} has {have} training rows; gate training needs more")
    return np.concatenate(xs), np.concatenate(zs)


def _heldout_batches(pairs: PairsStore, split: Split, device, *, max_rows: int | None = None, batch: int = 4096
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out rows as float32 tensors in batches of at most ``batch`` (first ``max_rows`` only)."""
    seen = 0
    for s, e in split.blocks(pairs):
        if max_rows is not None and seen >= max_rows:
            return
        x, z = split.read(pairs, s, e, heldout=True)
        if max_rows is not None:
            x, z = x[: max_rows - seen], z[: max_rows - seen]
        seen += len(x)
        for i in range(0, len(x), batch):
            yield torch.from_numpy(x[i:i + batch]).to(device), torch.from_numpy(z[i:i + batch]).to(device)


class _ErrorSums:
    """Streaming sums for relative error ``‖y − z‖/‖z‖`` and pooled R² ``1 − SSE/Σ(z − z̄_col)²``."""

    def __init__(self):
        self.sse = 0.0  # Σ (y − z)²
        self.n = 0  # rows seen
        self.zsum = None  # Σ z per column (float64)
        self.zsq = 0.0  # Σ z²

    def add_target(self, z: torch.Tensor) -> None:
        zd = z.double()
        self.zsum = zd.sum(0) if self.zsum is None else self.zsum + zd.sum(0)
        self.zsq += float(zd.pow(2).sum())
        self.n += z.shape[0]

    def add_error(self, y: torch.Tensor, z: torch.Tensor) -> None:
        self.sse += float((y.double() - z.double()).pow(2).sum())

    def metrics(self, t: "_ErrorSums") -> dict:
        """Relative error and R² of the errors summed here, against the targets summed in ``t``."""
        if not t.n:
            raise DataError("no held-out rows to measure on (is the holdout share 0 or the store empty?)")
        sst = t.zsq - float(t.zsum.pow(2).sum()) / t.n
        return {"rel_err": math.sqrt(self.sse / t.zsq) if t.zsq > 0 else float("nan"),
                "r2": 1.0 - self.sse / sst if sst > 0 else float("nan"), "rows": t.n}


def heldout_metrics(pairs: PairsStore, split: Split, predictors: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                    *, device="cpu", max_rows: int | None = None, progress: Progress | None = None) -> dict:
    """Relative error and R² of each predictor ``x [B, d_in] -> y [B, d_out]`` on the held-out rows.

    >>> import numpy as np
    >>> p = PairsStore.create("memory://doc-gates-hm", d_in=3, d_out=2, overwrite=True)
    >>> x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    >>> _ = p.append(x, x[:, :2])
    >>> m = heldout_metrics(p, Split(0.2, 0), {"exact": lambda x: x[:, :2], "zero": lambda x: 0 * x[:, :2]})
    >>> m["exact"]["rel_err"], m["zero"]["rel_err"]
    (0.0, 1.0)
    """
    target, sums = _ErrorSums(), {k: _ErrorSums() for k in predictors}
    total = max_rows if max_rows is not None else split.counts(pairs)[1]
    with torch.no_grad():
        for x, z in _heldout_batches(pairs, split, device, max_rows=max_rows):
            target.add_target(z)
            for name, f in predictors.items():
                sums[name].add_error(f(x), z)
            if progress:
                progress(min(target.n, total), total)
    return {k: s.metrics(target) for k, s in sums.items()}


# -- training ----------------------------------------------------------------------------------


def _loss(tiles, gates, x, z, s: GateSettings, z_scale: float) -> torch.Tensor:
    y, routings = gated_forward(tiles, gates, x, sparsity=s.sparsity, temperature=s.temperature)
    loss = torch.nn.functional.mse_loss(y, z) / z_scale
    if s.balance_coef:
        loss = loss + s.balance_coef * sum(balance_loss(r) for r in routings) / len(routings)
    if s.z_loss_coef:
        loss = loss + s.z_loss_coef * sum(z_loss(r) for r in routings) / len(routings)
    return loss


def _check_batch(tiles: FrozenTiles, batch: int, max_bytes: int) -> None:
    """Refuse a minibatch whose intermediate products (kept for backward) would exceed ``max_bytes``."""
    per_row = sum(g.workers * min(g.tile_in, g.tile_out) + g.d_out_pad + g.workers * 4 for g in tiles.grids) * 4 * 2
    if per_row * batch > max_bytes:
        raise DataError(f"a minibatch of {batch} rows needs about {per_row * batch / 2**20:.0f} MiB of intermediates, "
                        f"over the {max_bytes / 2**20:.0f} MiB budget: lower --batch-size")


def _epoch(tiles, gates, opt, pairs, split, s: GateSettings, epoch: int, z_scale: float, tick) -> float:
    """One pass over the training rows in a seeded shuffled block order; returns the mean loss."""
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
                raise FitError(f"gate training diverged in epoch {epoch} (loss {float(loss)}): lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
            tick(len(idx))
    return total / max(n, 1)


class _Run:
    """One gate-training run: gates, optimizer, history, best gate, early-stopping counter."""

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
        self.bad_epochs, self.stopped, self.z_scale = int(meta["bad_epochs"]), bool(meta["stopped"]), float(meta["z_scale"])


def _save_state(adapter: AdapterStore, run: _Run, settings: GateSettings, split: Split) -> None:
    """Write the run's state into the free slot, then point the record at it (metadata last)."""
    root = adapter.group.require_group(_STATE)
    slot = 1 - int(root.attrs.get("slot", 1))
    grp = root.require_group(f"slot{slot}")
    for name, data in run.state_arrays().items():
        if name in grp and grp[name].shape == data.shape:
            grp[name][...] = data
        else:
            create_chunked(grp, name, data.shape, data.shape, "float32", adapter.options, overwrite=True)[...] = data
    root.attrs.update({"slot": slot, "settings": settings.resume_key(), "split": asdict(split), **run.state_meta()})


def _load_state(adapter: AdapterStore) -> tuple[dict, dict[str, np.ndarray]] | None:
    if _STATE not in adapter.group or "slot" not in adapter.group[_STATE].attrs:
        return None
    root = adapter.group[_STATE]
    meta = dict(root.attrs)
    grp = root[f"slot{meta['slot']}"]
    with reading(f"gate-training state in {adapter.url}"):
        arrays = {name: np.asarray(arr[...]) for name, arr in grp.arrays()}
    return meta, arrays


def fit_gates(adapter, pairs, *, sparsity: float = GateSettings.sparsity, epochs: int = GateSettings.epochs,
              lr: float = GateSettings.lr, batch_size: int = GateSettings.batch_size,
              balance_coef: float = GateSettings.balance_coef, z_loss_coef: float = GateSettings.z_loss_coef,
              temperature: float = GateSettings.temperature, init: str = GateSettings.init,
              patience: int = GateSettings.patience, holdout: float | None = None, seed: int | None = None, restart: bool = False,
              device="cpu", max_tile_bytes: int = DEFAULT_MAX_TILE_BYTES, max_eval_rows: int | None = None,
              progress: Progress | None = None) -> dict:
    """Train every pipe's gate on the frozen tiles and write it into the adapter store.

    Minibatches stream from the pairs store's training rows; the held-out rows (the fit's seeded
    split, see :func:`resolve_split`) decide early stopping, and the gate with the lowest held-out
    error is written (:meth:`AdapterStore.write_gate`) with the settings and metrics in
    ``attrs["gates"]``. After every epoch the gates, Adam's state and the epoch are saved in the
    adapter, so a re-run resumes from the last saved epoch (``restart=True`` starts over; changed
    settings other than ``epochs``/``patience`` require it). Returns a summary dict.

    >>> import numpy as np
    >>> from prismoe_store.fit.job import fit
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 8)).astype(np.float32)
    >>> p = PairsStore.create("memory://doc-gates-fit-p", d_in=8, d_out=4, overwrite=True)
    >>> _ = p.append(x, x @ rng.normal(size=(8, 4)).astype(np.float32))
    >>> a = fit(p, "memory://doc-gates-fit-a", workers=4, scheduler="synchronous", overwrite=True)
    >>> r = fit_gates(a, p, sparsity=0.5, epochs=1)
    >>> r["epochs_run"], a.read_gate(0)[0].shape, a.attrs()["gates"]["complete"]
    (1, (4, 8), True)
    """
    adapter, pairs = _open(adapter, pairs, write=True)
    with adapter.keeping_gates():  # a run that fails puts the gates it replaced back
        try:
            return _fit_gates(adapter, pairs, sparsity=sparsity, epochs=epochs, lr=lr, batch_size=batch_size,
                              balance_coef=balance_coef, z_loss_coef=z_loss_coef, temperature=temperature,
                              init=init, patience=patience, holdout=holdout, seed=seed, restart=restart,
                              device=device, max_tile_bytes=max_tile_bytes, max_eval_rows=max_eval_rows,
                              progress=progress)
        except PrismoeError:
            if restart and _STATE in adapter.group:  # its state goes with its gates: nothing resumes it
                del adapter.group[_STATE]
            raise


def _fit_gates(adapter: AdapterStore, pairs: PairsStore, *, sparsity, epochs, lr, batch_size, balance_coef,
               z_loss_coef, temperature, init, patience, holdout, seed, restart, device, max_tile_bytes,
               max_eval_rows, progress) -> dict:
    split = resolve_split(adapter, holdout, seed)
    s = GateSettings(sparsity=sparsity, temperature=temperature, epochs=epochs, lr=lr, batch_size=batch_size,
                     balance_coef=balance_coef, z_loss_coef=z_loss_coef, init=init, patience=patience,
                     holdout=split.holdout, seed=split.seed)
    dev = _device(device)
    tiles = FrozenTiles.load(adapter, device=dev, max_bytes=max_tile_bytes)
    _check_batch(tiles, s.batch_size, max_tile_bytes)

    saved = None if restart else _load_state(adapter)
    if saved is not None and saved[0].get("settings") != s.resume_key():
        diff = sorted(k for k, v in s.resume_key().items() if saved[0].get("settings", {}).get(k) != v)
        raise DataError(f"saved gate training used other settings ({', '.join(diff)}): pass --restart to start over")
    adapter.update_attrs(gates=GatesRecord(asdict(s), False, SplitRecord(**asdict(split))).to_dict())

    if saved is not None:
        meta, arrays = saved
        run = _Run(tiles, pairs, split, s, gates=Gates.zeros(tiles.grids, tiles.d_in).to(dev),
                   z_scale=float(meta["z_scale"]), max_eval_rows=max_eval_rows)
        run.load_state(arrays, meta)
        stored = [adapter.read_gate(p) for p in range(adapter.n_pipes)]
        run.best_gates = stored if all(x is not None for x in stored) else run.gates.export()
        resumed_from = run.epoch
        before = meta.get("before") or {}
    else:
        xs, zs = _sample_train(pairs, split, s.init_rows, s.seed)
        x0 = torch.from_numpy(xs).to(dev)
        z_scale = float(np.mean(np.square(zs, dtype=np.float64))) or 1.0
        gates = init_gates(tiles, x0, torch.from_numpy(zs).to(dev), kind=s.init, scale=s.init_scale)
        run = _Run(tiles, pairs, split, s, gates=gates, z_scale=z_scale, max_eval_rows=max_eval_rows)
        before = _before(tiles, gates, pairs, split, s, dev, max_eval_rows)
        run.record(None)  # epoch 0: the initialised gate
        _write_gates(adapter, run.best_gates)
        _save_state(adapter, run, s, split)
        adapter.group[_STATE].attrs["before"] = before
        resumed_from = None

    def on_epoch(improved: bool) -> None:
        if improved:
            _write_gates(adapter, run.best_gates)
        _save_state(adapter, run, s, split)

    run.train(progress, on_epoch)
    summary = {"sparsity": s.sparsity, "k": [s.k(g.active_count) for g in tiles.grids],
               "epochs_run": run.epoch, "best_epoch": run.best["epoch"], "stopped_early": run.stopped,
               "resumed_from": resumed_from, "heldout_rows": split.counts(pairs)[1] if max_eval_rows is None else max_eval_rows,
               "before": before, "after": {"rel_err": run.best["rel_err"], "r2": run.best["r2"]},
               "history": run.history, "split": asdict(split)}
    adapter.update_attrs(gates=GatesRecord(asdict(s), True, SplitRecord(**asdict(split)),
                                           {k: summary[k] for k in ("before", "after", "best_epoch", "epochs_run",
                                                                    "stopped_early")}).to_dict())
    return summary


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
