"""The data a gate job reads: the adapter and the pairs, the seeded held-out split, and metrics on it.

- :func:`open_stores`: the adapter and pairs stores, checked to go together;
- :class:`Split`, :func:`resolve_split`: the seeded held-out split (the adapter fit's, unless
  options override it) and reading a row block's training or held-out rows;
- :func:`sample_training_rows`, :func:`heldout_batches`: a seeded sample of training rows (the
  gate init) and the held-out rows streamed as tensors;
- :func:`heldout_metrics`: the streamed relative error and R² of predictors on the held-out rows.

>>> Split(0.5, 0).mask(0, 4).tolist()
[False, True, True, True]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from prismoe_store.errors import DataError, IncompleteStoreError, StoreError
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore, holdout_mask

Progress = Callable[[int, int], None]  # progress(done, total)


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


def open_stores(adapter, pairs, *, write: bool = False) -> tuple[AdapterStore, PairsStore]:
    """The adapter and the pairs a gate job reads (paths or open stores), checked to go together:
    :class:`~prismoe_store.errors.IncompleteStoreError` for an unfinished adapter,
    :class:`~prismoe_store.errors.DataError` for other widths, :class:`~prismoe_store.errors.StoreError`
    when ``write`` and the adapter is open read-only."""
    if not isinstance(adapter, AdapterStore):
        adapter = AdapterStore.open(adapter, "r+" if write else "r")
    if not isinstance(pairs, PairsStore):
        pairs = PairsStore.open(pairs)
    if not adapter.complete:
        raise IncompleteStoreError(f"adapter {adapter.url} is not finished: re-run `prismoe fit` to complete it")
    if pairs.hidden_only and adapter.d_out:
        raise DataError(f"{pairs.url} holds hidden states only (no z): the gates of a fitted adapter need pairs "
                        "with z (hidden states train a head adapter's band gate)")
    if (pairs.d_in, pairs.d_out) != (adapter.d_in, adapter.d_out):
        raise DataError(f"pairs are {pairs.d_in}→{pairs.d_out} but the adapter maps {adapter.d_in}→{adapter.d_out}")
    if write and adapter.group.read_only:
        raise StoreError(f"adapter {adapter.url} is open read-only: open it with mode 'r+' to write gates")
    return adapter, pairs



def sample_training_rows(pairs: PairsStore, split: Split, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


def heldout_batches(pairs: PairsStore, split: Split, device, *, max_rows: int | None = None, batch: int = 4096
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

    def metrics(self, t: _ErrorSums) -> dict:
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
        for x, z in heldout_batches(pairs, split, device, max_rows=max_rows):
            target.add_target(z)
            for name, f in predictors.items():
                sums[name].add_error(f(x), z)
            if progress:
                progress(min(target.n, total), total)
    return {k: s.metrics(target) for k, s in sums.items()}
