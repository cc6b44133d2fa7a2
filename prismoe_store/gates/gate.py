"""The trainable gates: their parameters, the gated forward pass, and their initialisation.

Each pipe's gate is a linear layer ``s = x W_gᵀ + b_g`` (one score per worker). Routing —
top-k with ``K = round(ρ·n)`` and the ``joint`` / ``independent`` weights — is
:func:`prismoe_store.gates.routing.route`, shared with the runtime. This module adds:

- :class:`Gates`: the trainable gates of all pipes, kept in standardized input units so one
  learning rate suits any activation scale, exported as plain ``(W_g, b_g)`` for the store;
- :func:`gated_forward`: the gated adapter ``y = Σ_p α_p y_p`` on the
  :class:`~prismoe_store.gates.tiles.FrozenTiles`, differentiable in the gates;
- :func:`init_gates`: ``gain`` (the default: a linear least-squares prediction of how much each
  tile alone lowers its band's error, ``2⟨T_j x_c, z_r⟩ − ‖T_j x_c‖²``, so the untrained gate
  already picks useful tiles), ``energy`` (the same for the tile's output norm ``‖T_j x_c‖``) or
  ``zero`` (uniform scores: ties broken by ``torch.topk``, i.e. a fixed arbitrary subset).

See ``docs/gates.md`` for the choices and their reasons.

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
from collections.abc import Sequence

import numpy as np
import torch

from prismoe_store.errors import DataError
from prismoe_store.gates.routing import Routing, active_mask, route
from prismoe_store.gates.settings import INITS, GateSettings
from prismoe_store.gates.tiles import FrozenTiles
from prismoe_store.grid import GridSpec
from prismoe_store.stores.adapter import AdapterStore


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

    mean: torch.Tensor  # buffer [d_in]: μ
    scale: torch.Tensor  # buffer [d_in]: σ̃

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], *,
                 mean: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        d_in = weights[0].shape[1]
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(w.detach().float().clone()) for w in weights])
        self.biases = torch.nn.ParameterList([torch.nn.Parameter(b.detach().float().clone()) for b in biases])
        self.register_buffer("mean", torch.zeros(d_in) if mean is None else mean.detach().float().clone())
        self.register_buffer("scale", torch.ones(d_in) if scale is None else scale.detach().float().clone())

    @classmethod
    def zeros(cls, grids: Sequence[GridSpec], d_in: int, **kw) -> Gates:
        """All-zero gates (uniform scores)."""
        return cls([torch.zeros(g.workers, d_in) for g in grids], [torch.zeros(g.workers) for g in grids], **kw)

    @classmethod
    def from_arrays(cls, gates: Sequence[tuple[np.ndarray, np.ndarray]]) -> Gates:
        """Gates from stored ``(W_g [workers, d_in], b_g [workers])`` per pipe (no standardization)."""
        return cls([torch.from_numpy(np.asarray(w, np.float32)) for w, _ in gates],
                   [torch.from_numpy(np.asarray(b, np.float32)) for _, b in gates])

    @classmethod
    def from_store(cls, adapter: AdapterStore) -> Gates:
        """The adapter's stored gates; :class:`~prismoe_store.errors.DataError` when it has none."""
        stored = [adapter.read_gate(p) for p in range(adapter.n_pipes)]
        gates = [s for s in stored if s is not None]
        if len(gates) < len(stored):
            raise DataError(f"adapter {adapter.url} has no gates yet: run `prismoe fit-gates` first")
        return cls.from_arrays(gates)

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
    y: torch.Tensor | float = 0.0
    routings: list[Routing] = []
    for p, g in enumerate(tiles.grids):
        r = route(xs, gates.weights[p], gates.biases[p], grid=g, sparsity=sparsity, mode=tiles.mode,
                  temperature=temperature)
        w = r.dense_weights().reshape(-1, g.rows, g.cols)
        y = y + tiles.alphas[p] * tiles.product(p, xpad, w)
        routings.append(r)
    assert isinstance(y, torch.Tensor), "an adapter has at least one pipe"
    return y, routings


MAX_INIT_SCORES = 10.0  # most standard deviations (``scale``) an initial score may lie from the mean


def init_gates(tiles: FrozenTiles, x: torch.Tensor, z: torch.Tensor | None = None, *, kind: str = "gain",
               scale: float = GateSettings.init_scale) -> Gates:
    """Initial gates from a sample of training rows ``x [S, d_in]`` (and targets ``z [S, d_out]``).

    ``gain`` (default): per pipe, a ridge regression (float64) on the standardized input of each
    tile's *gain* ``2⟨T_j x_c, z_r⟩ − ‖T_j x_c‖²`` (how much that tile alone lowers its band's
    squared error on the token), rescaled so the scores have standard deviation ``scale`` across
    rows and active workers: the init's top-k is the top-k of the predicted gains. Inputs with outlier
    dimensions (a residual stream's, ``|x|`` up to ~2.5e4 in SmolLM2's layer 12) make a few
    predictions far out in the tails: the scale then shrinks until no score on the sample lies
    beyond ``MAX_INIT_SCORES · scale`` of the mean (the top-k is the same; only the weights stay ≈ 1 —
    without it one tile got ~6× weight and the init gate's R² at ρ = 1 was −42 on that bridge). ``energy``: the
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
        else:  # std `scale`, and no score beyond MAX_INIT_SCORES·scale on the sample (outlier inputs)
            theta[-1] -= mu
            theta *= scale / max(sd, float((pred - mu).abs().max()) / MAX_INIT_SCORES)
        theta[:, ~act] = 0.0
        weights.append(theta[:-1].T.float())
        biases.append(theta[-1].float())
    return Gates(weights, biases, mean=mean, scale=gscale).to(tiles.device)
