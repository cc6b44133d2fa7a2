"""Token-level routing: gate scores, top-k selection and the weights that combine tiles.

One module, used by gate training (differentiable) and by the runtime. Per pipe and per token:
scores ``s = x W_gᵀ + b_g`` in float32; ``K = round(ρ·n)`` where ``n`` counts the workers whose
tile is not wholly padding (padding-only workers are never selected); ``S = topk(s, K)``.

- ``joint`` tiles: ``w = K · softmax(s_S / T)``. With a uniform gate and ρ = 1 every weight is 1,
  so the pipe equals its dense product exactly.
- ``independent`` tiles: a softmax over the selected workers *within each band* (each band's
  weights sum to 1; a band with no selected worker outputs 0).

>>> import torch
>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(8, 8, 4)
>>> r = route(torch.randn(3, 8), torch.zeros(4, 8), torch.zeros(4), grid=g, sparsity=1.0)
>>> r.indices.shape, bool(torch.allclose(r.weights, torch.ones(3, 4)))
(torch.Size([3, 4]), True)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from prismoe_store.errors import DataError
from prismoe_store.grid import GridSpec


def k_for(sparsity: float, n_active: int) -> int:
    """``K = round(ρ·n)`` with halves rounded up (not Python's half-to-even), at least 1 and at most ``n``.

    >>> k_for(0.3, 512), k_for(1.0, 7), k_for(0.01, 7), k_for(0.5, 5)
    (154, 7, 1, 3)
    """
    if not 0.0 < sparsity <= 1.0:
        raise DataError(f"sparsity must be in (0, 1], got {sparsity}")
    return max(1, min(n_active, math.floor(sparsity * n_active + 0.5)))


def active_mask(grid: GridSpec, device=None) -> torch.Tensor:
    """Bool ``[workers]``: True for workers whose tile touches the true matrix (cached per grid and device)."""
    return _active_mask(grid, str(torch.device(device or "cpu"))).clone()


@functools.lru_cache(maxsize=64)
def _active_mask(grid: GridSpec, device: str) -> torch.Tensor:
    live_rows = -(-grid.d_out // grid.tile_out)
    live_cols = -(-grid.d_in // grid.tile_in)
    rows = torch.arange(grid.rows, device=device) < live_rows
    cols = torch.arange(grid.cols, device=device) < live_cols
    return (rows[:, None] & cols[None, :]).reshape(-1)


@dataclass(frozen=True)
class Routing:
    """The routing decision for a batch of tokens in one pipe."""

    indices: torch.Tensor  # long [B, K]: selected workers, by descending score
    weights: torch.Tensor  # float32 [B, K]: combination weight of each selected worker
    scores: torch.Tensor  # float32 [B, workers]: raw gate scores (padding workers at -inf)

    def dense_weights(self) -> torch.Tensor:
        """float32 ``[B, workers]``: the weights scattered into worker order (0 where not selected)."""
        out = torch.zeros_like(self.scores)
        return out.scatter(1, self.indices, self.weights)


def scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: GridSpec) -> torch.Tensor:
    """Gate scores ``[B, workers]`` in float32, padding-only workers set to ``-inf``."""
    s = x.float() @ weight.float().T + bias.float()  # [B, W]
    return s.masked_fill(~active_mask(grid, s.device), float("-inf"))


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, grid: GridSpec, sparsity: float,
          mode: str = "joint", temperature: float = 1.0) -> Routing:
    """Route tokens ``x [B, d_in]`` through a pipe's gate; see the module docstring for the weights.

    >>> import torch
    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(8, 8, 4)
    >>> r = route(torch.randn(5, 8), torch.randn(4, 8), torch.zeros(4), grid=g, sparsity=0.5, mode="independent")
    >>> r.indices.shape
    torch.Size([5, 2])
    """
    return route_scores(scores(x, weight, bias, grid), grid=grid, sparsity=sparsity, mode=mode,
                        temperature=temperature)


def route_scores(s: torch.Tensor, *, grid: GridSpec, sparsity: float, mode: str = "joint",
                 temperature: float = 1.0) -> Routing:
    """:func:`route` from gate scores ``s [B, workers]`` already computed (padding workers at ``-inf``,
    as :func:`scores` gives them): the runtime takes every pipe's scores in one product.

    >>> import torch
    >>> from prismoe_store.grid import plan_grid
    >>> route_scores(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), grid=plan_grid(8, 8, 4), sparsity=0.5).indices.tolist()
    [[1, 3]]
    """
    if temperature <= 0:
        raise DataError(f"temperature must be positive, got {temperature}")
    k = k_for(sparsity, grid.active_count)
    top, idx = torch.topk(s, k, dim=1)  # [B, K], [B, K]
    top = top / temperature
    if mode == "joint":
        w = k * torch.softmax(top, dim=1)  # [B, K], sums to K per token
    elif mode == "independent":
        w = _band_softmax(top, idx // grid.cols, grid.rows)  # [B, K], sums to 1 per (token, band)
    else:
        raise DataError(f"mode must be 'joint' or 'independent', got {mode!r}")
    return Routing(indices=idx, weights=w, scores=s)


def _band_softmax(logits: torch.Tensor, band: torch.Tensor, n_bands: int) -> torch.Tensor:
    """Softmax of ``logits [B, K]`` within groups given by ``band [B, K]`` (values < n_bands)."""
    B = logits.shape[0]
    init = torch.full((B, n_bands), float("-inf"), device=logits.device, dtype=logits.dtype)
    band_max = init.scatter_reduce(1, band, logits, reduce="amax", include_self=True)  # [B, R]
    e = torch.exp(logits - band_max.gather(1, band).detach())  # [B, K]
    sums = torch.zeros(B, n_bands, device=logits.device, dtype=logits.dtype).scatter_add(1, band, e)  # [B, R]
    return e / sums.gather(1, band)


def probabilities(s: torch.Tensor) -> torch.Tensor:
    """Softmax over all (active) workers of scores ``[B, W]`` — ``P`` of the balance loss."""
    return torch.softmax(s, dim=1)


def balance_loss(r: Routing) -> torch.Tensor:
    """Load-balancing loss ``W · Σ_i f_i P_i / K`` (``f_i``: share of tokens routed to worker i,
    ``P_i``: its mean softmax probability over all workers, ``W = R·C``). Perfectly even routing
    over the ``n`` active workers gives ``W / n`` (1 when no worker is padding-only).

    >>> import torch
    >>> s = torch.zeros(2, 4)
    >>> r = Routing(indices=torch.tensor([[0, 1], [2, 3]]), weights=torch.ones(2, 2), scores=s)
    >>> float(balance_loss(r))
    1.0
    """
    B, W = r.scores.shape
    K = r.indices.shape[1]
    f = torch.zeros(W, device=r.scores.device).scatter_add(
        0, r.indices.reshape(-1), torch.ones(r.indices.numel(), device=r.scores.device)) / B  # [W], sums to K
    P = probabilities(r.scores).mean(0)  # [W]
    return W * (f * P).sum() / K


def z_loss(r: Routing) -> torch.Tensor:
    """Router z-loss: mean squared log-sum-exp of the active scores (keeps logits small)."""
    return torch.logsumexp(r.scores, dim=1).pow(2).mean()
