"""The held-out evaluation of the adapter benchmark: the fit's held-out rows and the quality scores.

:func:`read_heldout` reads the first held-out rows of the fit's seeded split; :class:`Heldout`
keeps them on the device and scores any ``predict(x) -> y`` against the targets ``z``: relative
error ``‖y − z‖/‖z‖``, pooled R² ``1 − SSE/Σ(z − z̄)²`` (``z̄``: per-output mean of the evaluated
rows) and, when ``z`` are logits, top-1 agreement and the mean ``KL(softmax z ‖ softmax y)``.

>>> import numpy as np, torch
>>> x = np.eye(3, dtype=np.float32); z = 2 * x
>>> s = Heldout(x, z, torch.device("cpu"), logits=False, batch=2).score(lambda t: 2 * t)
>>> s["rel_err"], s["r2"]
(0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from prismoe_store.errors import DataError
from prismoe_store.gates.training import resolve_split
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore

KL_ELEMENTS = 1 << 24  # logits evaluated at a time (rows × d_out) when computing KL


def targets_are_logits(provenance: dict) -> bool:
    """True when a pairs store's provenance says ``z`` are logits (``prismoe collect --target logits``).

    >>> targets_are_logits({"settings": {"target": "logits"}}), targets_are_logits({"source": "synth"})
    (True, False)
    """
    value = provenance.get("settings")
    settings: dict = value if isinstance(value, dict) else {}
    return (settings.get("target") or provenance.get("target")) == "logits"


class Heldout:
    """The evaluated held-out rows on the device, with the target's sums for R²."""

    def __init__(self, x: np.ndarray, z: np.ndarray, device: torch.device, logits: bool, batch: int):
        self.x = torch.from_numpy(x).to(device)  # [n, M]
        self.z = torch.from_numpy(z).to(device)  # [n, N]
        zd = self.z.double()
        self.zsq = float(zd.pow(2).sum())
        self.sst = float((zd - zd.mean(0)).pow(2).sum())
        self.logits = logits
        self.batch = max(1, min(batch, KL_ELEMENTS // max(1, z.shape[1]))) if logits else batch

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def score(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Relative error, R² (and top-1 agreement, KL for logits) of ``predict`` on the rows."""
        sse, top1, kl = 0.0, 0, 0.0
        with torch.no_grad():
            for s in range(0, self.rows, self.batch):
                x, z = self.x[s:s + self.batch], self.z[s:s + self.batch]
                y = predict(x).float()
                sse += float((y.double() - z.double()).pow(2).sum())
                if self.logits:
                    top1 += int((y.argmax(1) == z.argmax(1)).sum())
                    lz, ly = F.log_softmax(z.float(), 1), F.log_softmax(y, 1)
                    kl += float((lz.exp() * (lz - ly)).sum(1).clamp_min(0).double().sum())  # ≥ 0 up to rounding
        out = {"rel_err": math.sqrt(sse / self.zsq) if self.zsq > 0 else float("nan"),
               "r2": 1.0 - sse / self.sst if self.sst > 0 else float("nan"), "top1": None, "kl": None}
        if self.logits:
            out["top1"], out["kl"] = top1 / self.rows, kl / self.rows
        return out


def read_heldout(adapter: AdapterStore, pairs: PairsStore, max_rows: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The first ``max_rows`` held-out rows of the fit's seeded split."""
    split = resolve_split(adapter)
    xs, zs, have = [], [], 0
    for s, e in split.blocks(pairs):
        x, z = split.read(pairs, s, e, heldout=True)
        xs.append(x[: max_rows - have])
        zs.append(z[: max_rows - have])
        have += len(xs[-1])
        if have >= max_rows:
            break
    if have == 0:
        raise DataError(f"{pairs.url} has no held-out rows under the fit's split (holdout {split.holdout}): "
                        "nothing to measure on")
    return np.concatenate(xs), np.concatenate(zs), asdict(split)
