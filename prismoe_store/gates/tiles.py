"""The frozen tiles of gate training: every pipe's tiles in memory, and the gated pipe product.

:class:`FrozenTiles` holds every pipe's tiles as one padded ``[d_out_pad, d_in_pad]`` float32
tensor (refused above a byte budget: gate training is for adapters whose tiles fit in RAM or
device memory; streaming tiles is the runtime's job) and computes the gated pipe product
``y_r = Σ_c w_rc · T_rc x_c`` for dense per-token weights ``w [B, R, C]``, differentiable in ``w``
(tiles frozen). :func:`torch_device` checks the device a gate job runs on.

>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(8, 8, 4)
>>> t = FrozenTiles([torch.eye(g.d_out_pad, g.d_in_pad)], [g], [1.0], "joint")
>>> x = torch.randn(5, 8)
>>> bool(torch.allclose(t.dense(x), x))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from prismoe_store.errors import DataError
from prismoe_store.gates.routing import active_mask
from prismoe_store.gates.settings import DEFAULT_MAX_TILE_BYTES
from prismoe_store.grid import GridSpec
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.verified import finite, reading

WORK_BYTES = 128 << 20  # bytes of per-tile partial products computed at a time (statistics, init)


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
    def load(cls, adapter: AdapterStore, *, device="cpu", max_bytes: int = DEFAULT_MAX_TILE_BYTES) -> FrozenTiles:
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
            what = f"tiles of pipe {p + 1} in {adapter.url}"
            with reading(what):  # NaN/Inf tiles are damage (they made training "diverge": lower --lr, it said)
                tiles.append(torch.from_numpy(finite(np.asarray(adapter.tiles(p)[...], np.float32), what)).to(device))
        return cls(tiles, adapter.grids, adapter.alphas, adapter.mode)

    @property
    def device(self) -> torch.device:
        """Where the tiles live."""
        return self.tiles[0].device

    def check_batch(self, batch: int, max_bytes: int) -> None:
        """Refuse (:class:`~prismoe_store.errors.DataError`) a minibatch of ``batch`` rows whose
        intermediate products (kept for backward) would exceed ``max_bytes``."""
        per_row = 8 * sum(g.workers * min(g.tile_in, g.tile_out) + g.d_out_pad + g.workers * 4 for g in self.grids)
        if per_row * batch > max_bytes:
            raise DataError(f"a minibatch of {batch} rows needs about {per_row * batch / 2**20:.0f} MiB of "
                            f"intermediates, over the {max_bytes / 2**20:.0f} MiB budget: lower --batch-size")

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
        xpad = self.pad(x)
        y: torch.Tensor | float = 0.0
        for p, g in enumerate(self.grids):
            act = active_mask(g, self.device).reshape(g.rows, g.cols).float()
            w = act if self.mode == "joint" else act / act.sum(1, keepdim=True).clamp_min(1)
            y = y + self.alphas[p] * self.product(p, xpad, w.expand(x.shape[0], -1, -1))
        assert isinstance(y, torch.Tensor), "an adapter has at least one pipe"
        return y



def torch_device(device) -> torch.device:
    """``device`` (a name such as ``"cpu"``, ``"cuda:1"``, or a :class:`torch.device`) checked:
    :class:`~prismoe_store.errors.DataError` for a bad name or CUDA asked for where there is none.

    >>> torch_device("cpu")
    device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' asked for but CUDA is not available")
    return dev
