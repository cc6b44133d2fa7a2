"""The truncated-SVD baseline: the best rank-``r`` approximation of a dense matrix at a byte budget.

The narrow side's eigenbasis comes from the Gram matrix (``WᵀW`` or ``WWᵀ``), accumulated band by
band in float64, so the SVD is exact without a full decomposition of a tall matrix; ``r`` is the
largest rank whose two factors take no more bytes than a budget (:func:`svd_rank`).

>>> import numpy as np
>>> w = np.diag([3.0, 2.0, 1.0]).astype(np.float32)
>>> a, b = GramSvd.of(w).factors(w, 1)
>>> (a @ b).numpy().round(3).tolist()
[[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GramSvd:
    """The narrow-side eigenbasis of ``W`` (from its Gram matrix): ``W_r = W V_r V_rᵀ`` (or ``U_r U_rᵀ W``)."""

    basis: torch.Tensor  # [k, k] float64 eigenvectors, columns by descending eigenvalue (k = min(M, N))
    values: np.ndarray  # [k] eigenvalues σ² (descending)
    right: bool  # True: basis spans the input side (V), False: the output side (U)

    @classmethod
    def of(cls, w: np.ndarray, band: int = 4096) -> GramSvd:
        n, m = w.shape
        right = m <= n
        k = min(m, n)
        gram = np.zeros((k, k), np.float64)
        if right:  # WᵀW accumulated over row bands of W
            for s in range(0, n, band):
                b = w[s:s + band].astype(np.float64)
                gram += b.T @ b
        else:
            for s in range(0, m, band):
                b = w[:, s:s + band].astype(np.float64)
                gram += b @ b.T
        vals, vecs = np.linalg.eigh(gram)
        order = np.argsort(vals)[::-1]
        return cls(torch.from_numpy(np.ascontiguousarray(vecs[:, order])), np.maximum(vals[order], 0.0), right)

    def factors(self, w: np.ndarray, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [d_out, r], B [r, d_in])`` float32 with ``W_r = A B``."""
        basis = self.basis[:, :rank].float()  # [k, r]
        wt = torch.from_numpy(w)
        if self.right:
            return wt @ basis, basis.T.contiguous()
        return basis.contiguous(), basis.T @ wt


def svd_rank(active_bytes: int, d_in: int, d_out: int, itemsize: int = 4) -> int:
    """The largest rank whose factors ``[d_out, r]`` and ``[r, d_in]`` fit in ``active_bytes``
    (at least 1, at most ``min(d_in, d_out)``).

    >>> svd_rank(4 * 10 * (64 + 256), 64, 256), svd_rank(10**9, 64, 256)
    (10, 64)
    """
    return max(1, min(min(d_in, d_out), active_bytes // (itemsize * (d_in + d_out))))
