"""Ridge least-squares solves from streamed sufficient statistics.

The fit (:mod:`prismoe_store.fit.job`) reduces the pairs to small statistics in one pass; this module
turns them into solutions. Two kinds of statistics, two solvers:

- ``cholesky`` (normal equations): ``G = XᵀX`` and ``B = XᵀZ``. :func:`factor_normal` factors
  ``G + λI`` once (a Cholesky that reports trouble: a failed or near-singular factorization falls
  back to an eigendecomposition pseudo-inverse and says so in :attr:`Factor.warning`); each
  output band is then two triangular solves, ``W_rᵀ = (G + λI)⁻¹ B_r``.
- ``qr`` (for ill-conditioned ``X``): the triangular factor ``R`` of ``X = QR`` and ``Qᵀ Z``,
  built by streaming Householder updates (:func:`qr_update`) and merged across row stripes
  (:func:`qr_merge`) — a TSQR that never forms ``Q`` and never squares the condition number.
  :func:`factor_qr` folds the ridge in as ``√λ I`` rows and solves ``R' W_rᵀ = Q'ᵀ (QᵀZ_r)``.

Both minimize ``‖X Wᵀ − Z‖² + λ‖W‖²``, so for well-conditioned data they agree.
All arithmetic here is float64 (numpy's LAPACK: neither SciPy nor torch is needed, so a fit
does not pay for importing them).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x, z = rng.standard_normal((50, 4)), rng.standard_normal((50, 3))
>>> w = factor_normal(x.T @ x, 0.0).solve(x.T @ z)
>>> bool(np.allclose(w, np.linalg.lstsq(x, z, rcond=None)[0]))
True
>>> r, qz = qr_update(np.zeros((4, 4)), np.zeros((4, 3)), x, z)
>>> bool(np.allclose(factor_qr(r, 0.0).solve(qz), w))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from prismoe_store.stores.verified import reading

F32_FLOOR = 2.0 ** -48  # float32 unit roundoff squared: with the block rows, B's noise floor in G's units
RIDGE_SCALE = 1e-6  # default λ = RIDGE_SCALE · trace(G) / M: a millionth of the mean eigenvalue of G
_EPS = np.finfo(np.float64).eps
STAT_SETS = ("train", "sub")  # statistics kept per fit: all training rows, and pipe 2's rows
PIPE_SETS = ("train", "sub", "train")  # which statistics pipe p fits on


def default_ridge(trace: float, m: int) -> float:
    """The scale-aware default ridge ``λ = 1e-6 · trace(G)/M``.

    ``trace(G)/M`` is the mean eigenvalue of ``G`` (the mean squared column norm of ``X``), so λ
    damps only directions a million times weaker than the average one: invisible on
    well-conditioned data, enough to make a rank-deficient ``X`` (zero, duplicate or padding
    columns) solvable. An all-zero ``X`` gets ``λ = 1``.

    >>> default_ridge(2e6, 2)
    1.0
    """
    lam = RIDGE_SCALE * float(trace) / max(1, int(m))
    return lam if lam > 0 and np.isfinite(lam) else 1.0


def describe_ridge(ridge: dict, given: float | None = None) -> str:
    """One line on a fit's ridge λ per row set: its value, the rows and pipes that use it, and where
    it came from (``given``: the fit's ``ridge`` setting; None: the scale-aware default).

    >>> describe_ridge({"train": 0.0294, "sub": 0.0176})  # doctest: +NORMALIZE_WHITESPACE
    "train 0.0294 (all training rows: pipes 1, 3), sub 0.0176 (pipe 2's subsample):
     1e-6 · trace(XᵀX)/d_in of each row set (the default; --ridge sets one)"
    """
    rows = {"train": "all training rows", "sub": "pipe 2's subsample"}
    uses = {s: [p + 1 for p, name in enumerate(PIPE_SETS) if name == s] for s in ridge}
    parts = []
    for s, v in ridge.items():
        who = rows.get(s, s) + (f": pipes {', '.join(map(str, uses[s]))}" if len(uses[s]) > 1 else "")
        parts.append(f"{s} {v:.3g} ({who})")
    why = "given (--ridge)" if given is not None else \
        "1e-6 · trace(XᵀX)/d_in of each row set (the default; --ridge sets one)"
    return ", ".join(parts) + ": " + why


@dataclass
class Factor:
    """A factorization of one ridge system; :meth:`solve` applies its inverse to right-hand sides."""

    kind: str  # "cholesky", "eigh" (pseudo-inverse fallback, or a projected solve), "qr" or "qr-lstsq"
    data: tuple  # the factors (float64 arrays), depending on kind
    warning: str | None = None  # set when the preferred factorization failed and a fallback was used

    def solve(self, b: np.ndarray) -> np.ndarray:
        """``A⁻¹ b`` for ``b`` of shape ``(m, k)`` (float64 result)."""
        rhs = np.asarray(b, dtype=np.float64)
        if self.kind == "cholesky":  # A⁻¹ = U⁻¹U⁻ᵀ from the Cholesky factor A = UᵀU: one product per solve
            (inv,) = self.data
            return inv @ rhs
        if self.kind == "eigh":
            vecs, inv = self.data
            return vecs @ (inv[:, None] * (vecs.T @ rhs))
        r, qtop = self.data
        rhs = rhs if qtop is None else qtop.T @ rhs
        if self.kind == "qr":  # LU of an upper triangular R pivots nowhere: a back substitution
            return np.linalg.solve(r, rhs)
        return np.linalg.lstsq(r, rhs, rcond=None)[0]  # "qr-lstsq": minimum-norm solution of R' w = Q'ᵀ rhs


def factor_normal(g: np.ndarray, lam: float, *, floor: float = 0.0) -> Factor:
    """Factor ``G + λI`` by Cholesky, falling back to an eigh pseudo-inverse when it fails.

    The Cholesky counts as failed when LAPACK reports a non-positive pivot or when the pivots
    span more than ``1/(m·ε)`` (the factor exists but solves would be noise). The fallback keeps
    eigenvalues above ``m·ε·max`` and drops the rest (a minimum-norm solution in that subspace).

    ``floor > 0`` (for right-hand sides carrying float32 rounding): when ``G`` has eigenvalues
    at or below ``floor``, the solve is ``V (Λ + λI)⁻¹ Vᵀ`` over the eigenvectors above it only,
    so a right-hand side's components along directions ``X`` (nearly) lacks — exactly zero in
    ``XᵀZ``, rounding noise in a float32 product — are dropped rather than amplified by ``1/λ``
    (and :attr:`Factor.warning` says how many). Whether there are any is one Cholesky of
    ``G − floor·I``.

    >>> f = factor_normal(np.zeros((3, 3)), 0.0)
    >>> f.kind, f.solve(np.ones((3, 1))).ravel().tolist()
    ('eigh', [0.0, 0.0, 0.0])
    >>> g = np.diag([4.0, 1e-20])
    >>> factor_normal(g, 1e-6, floor=1e-12).solve(np.array([[4.0], [1e-9]])).ravel().round(6).tolist()
    [1.0, 0.0]
    """
    m = g.shape[0]
    a = np.array(g, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("statistics hold NaN/Inf")
    if floor > 0 and m and _cholesky(a - floor * np.eye(m)) is None:
        vals, vecs = np.linalg.eigh(0.5 * (a + a.T))
        keep = vals > floor
        inv = np.where(keep, 1.0 / np.where(keep, vals + lam, 1.0), 0.0)
        return Factor("eigh", (vecs, inv), f"G has {int((~keep).sum())} eigenvalue(s) at or below {floor:.3g} "
                      "(zero, duplicate or dependent input columns): used an eigh solve without those directions")
    a[np.diag_indices(m)] += float(lam)
    chol = _cholesky(a)
    if chol is not None:
        d = np.diagonal(chol)
        if float(d.min()) ** 2 > float(d.max()) ** 2 * m * _EPS:
            uinv = np.linalg.inv(chol.T)  # LU of an upper triangle pivots nowhere: a triangular inverse
            return Factor("cholesky", (uinv @ uinv.T,))
        why = f"near-singular (pivot ratio {float(d.min() / d.max()) ** 2:.1e})"
    else:
        why = "not positive definite"
    return _eigh_factor(a, f"Cholesky of G + λI (λ={lam:.3g}) failed: {why}; used an eigh pseudo-inverse")


def _cholesky(a: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of ``a``, or None when ``a`` is not (numerically) positive definite."""
    if not a.shape[0]:
        return a
    try:
        chol = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return None
    return chol if np.isfinite(chol).all() else None


def _eigh_factor(a: np.ndarray, warning: str) -> Factor:
    a = 0.5 * (a + a.T)
    if not np.isfinite(a).all():
        raise ValueError("statistics hold NaN/Inf")
    vals, vecs = np.linalg.eigh(a)
    m = a.shape[0]
    top = float(np.abs(vals).max()) if m else 0.0
    keep = vals > top * m * _EPS
    inv = np.where(keep, 1.0 / np.where(keep, vals, 1.0), 0.0)
    return Factor("eigh", (vecs, inv), warning)


def factor_statistics(g: np.ndarray, slices: list[tuple[int, int]], lam: float, *, solver: str = "cholesky",
                      floor_rows: int = 0) -> tuple[list[Factor], list[tuple[tuple[int, int], str]]]:
    """Factor the ridge system of each input slice ``c0:c1`` of the statistics ``g`` (``G`` or
    ``R``): the factors, and the ``((c0, c1), warning)`` of those that needed a fallback.

    ``floor_rows > 0`` (mixed precision: ``B`` from float32 products of that many rows a block)
    drops the directions below ``F32_FLOOR · floor_rows · trace/M`` (see :func:`factor_normal`).
    Raises ``ValueError`` when the statistics hold NaN/Inf.

    >>> fs, warns = factor_statistics(np.eye(4), [(0, 2), (2, 4)], 0.0)
    >>> [f.kind for f in fs], warns
    (['cholesky', 'cholesky'], [])
    """
    out, warnings = [], []
    for c0, c1 in slices:
        block = g[c0:c1, c0:c1]
        if solver == "qr":
            f = factor_qr(block, lam)
        else:
            floor = F32_FLOOR * floor_rows * float(np.trace(block)) / max(1, c1 - c0)
            f = factor_normal(block, lam, floor=floor)
        if f.warning:
            warnings.append(((c0, c1), f.warning))
        out.append(f)
    return out, warnings


def factor_qr(r: np.ndarray, lam: float) -> Factor:
    """Prepare ``R`` (from :func:`qr_update`/:func:`qr_merge`) for ridge solves against ``QᵀZ``.

    With ``λ > 0`` the ridge rows are folded in: ``[R; √λ I] = Q'R'``, and a solve is
    ``R'⁻¹ Q'_topᵀ (QᵀZ)``. A numerically singular ``R'`` falls back to a minimum-norm
    least-squares solve (``gelsd``) with a warning.

    >>> f = factor_qr(np.diag([2.0, 0.0]), 0.0)
    >>> f.kind, f.solve(np.array([[4.0], [0.0]])).ravel().tolist()
    ('qr-lstsq', [2.0, 0.0])
    """
    m = r.shape[0]
    rt = np.array(r, dtype=np.float64)
    qtop = None
    if lam > 0:
        q, rt = np.linalg.qr(np.concatenate([rt, np.sqrt(lam) * np.eye(m)]))
        qtop = np.ascontiguousarray(q[:m])
    d = np.abs(np.diagonal(rt))
    if m and bool(np.isfinite(rt).all()) and float(d.min()) > float(d.max()) * m * _EPS:
        return Factor("qr", (rt, qtop))
    return Factor("qr-lstsq", (rt, qtop),
                  f"R of the QR path is numerically singular (λ={lam:.3g}); used a minimum-norm lstsq")


def qr_update(r: np.ndarray, qz: np.ndarray, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One streaming TSQR step: the ``(R, QᵀZ)`` of rows ``[previous; x]`` from the previous pair.

    ``R`` is ``(m, m)`` upper triangular, ``QᵀZ`` is ``(m, k)``; ``x`` is ``(n, m)``, ``z`` is
    ``(n, k)``. Start from zeros. Only the leading ``m`` columns are triangularized, so the cost
    is that of a QR of ``(m+n) × m`` plus one product with ``z`` — ``Z``'s own triangle (``k²``) is
    never formed.
    """
    if x.shape[0] == 0:
        return r, qz
    q, r_new = np.linalg.qr(np.concatenate([r, np.asarray(x, np.float64)]))
    qz_new = q.T @ np.concatenate([qz, np.asarray(z, np.float64)])
    return r_new, qz_new


def qr_merge(r1: np.ndarray, qz1: np.ndarray, r2: np.ndarray, qz2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Combine the ``(R, QᵀZ)`` of two disjoint row sets into that of their union (a TSQR tree node)."""
    return qr_update(r1, qz1, r2, qz2)


def solve_panel(f: Factor, rhs: np.ndarray, block: np.ndarray, o0: int, o1: int, p0: int, c0: int, c1: int,
                 q0: int, q1: int) -> None:
    """Solve the panel of output columns ``q0:q1`` (``rhs`` holds columns from ``p0``) for input
    columns ``c0:c1`` and put its rows ``o0:o1`` into ``block`` (output rows from ``o0``)."""
    lo, hi = max(o0, q0), min(o1, q1)
    block[lo - o0:hi - o0, c0:c1] = f.solve(rhs[c0:c1, q0 - p0:q1 - p0])[:, lo - q0:hi - q0].T


def band_runs(bands: list[int], most: int) -> list[tuple[int, int]]:
    """Runs ``[r0, r1)`` of consecutive bands, at most ``most`` bands each (solved and written together).

    >>> band_runs([0, 1, 2, 5, 6], 2)
    [(0, 2), (2, 3), (5, 7)]
    """
    runs: list[tuple[int, int]] = []
    for r in bands:
        if runs and runs[-1][1] == r and r - runs[-1][0] < most:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


class StatSource:
    """The finished statistics: from memory when the pass just produced them whole, else the scratch."""

    def __init__(self, scratch: zarr.Group, slicings: tuple[int, ...]):
        self.scratch = scratch
        self.slicings = slicings
        self._mem: dict | None = None

    def keep(self, sets: dict) -> None:
        self._mem = sets

    def g(self, set_name: str, width: int) -> np.ndarray:
        k = self.slicings.index(width)
        if self._mem is not None:
            return self._mem[set_name][0][k]
        with reading("fit statistics"):
            return self.scratch[f"{set_name}_G{width}"][...]

    def b(self, set_name: str, width: int, o0: int, o1: int) -> np.ndarray:
        k = self.slicings.index(width)
        if self._mem is not None:
            return self._mem[set_name][1][k][:, o0:o1]
        with reading("fit statistics"):
            return self.scratch[f"{set_name}_B{width}"][:, o0:o1]
