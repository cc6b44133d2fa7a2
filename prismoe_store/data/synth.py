"""Synthetic activation pairs with a known ground truth, written to a pairs store chunk by chunk.

Inputs are Gaussian with a few strong directions, like hidden states:
``x = g + h @ mix`` with ``g ~ N(0, I_M)``, ``h ~ N(0, I_k)`` and ``mix [k, M]`` = ``k`` random unit
directions scaled by 3, 2.25, 1.69, ... (so ``cov x = I + mixᵀ mix``, condition number ≤ 10).
``W [N, M]`` has ``N(0, 1/M)`` entries, so the clean target has entries of unit scale and
``noise`` is σ relative to it. Two targets:

* ``linear``: ``z = x Wᵀ + σ ε``. Least squares on the pairs recovers ``W`` to ``≈ σ·√(M/S)``.
* ``gated``: a piecewise-linear target that needs different tiles for different inputs.
  The matrix is cut into *blocks* of ``max tile_out × max tile_in`` over the three default pipe
  grids (:func:`~prismoe_store.grid.plan_pipes` with ``workers``). All tile sizes are powers of two
  aligned at 0, so every tile of every pipe lies inside exactly one block. Each block is owned
  by one of ``regions`` regions (a seeded, balanced assignment), and the regions split the input
  space by ``regions`` orthonormal gating directions ``gates [E, M]``:
  ``e(x) = argmax_e x·gates_e`` (about equally likely cones). Then
  ``z = x (W ⊙ Mask_{e(x)})ᵀ + σ ε``, where ``Mask_e`` is 1 on the blocks region ``e`` owns.
  So an input uses a ``1/E`` share of the tiles of every pipe and leaves the other output rows
  of its unowned bands at zero. A dense matrix fits this badly; a top-k gate with
  ``ρ = 1/E`` whose score for tile ``j`` is ``x·gates_{region(j)}`` (:meth:`SynthTruth.worker_regions`)
  selects exactly the tiles the target uses, all with equal scores (so ``K·softmax`` weights
  of 1): with the true tiles it reproduces the clean target exactly, where an untrained
  gate picks tiles the input does not use.

Rows are generated in fixed blocks of 256, block ``k`` from the random stream ``(seed, 1, k)``,
and the target is exact row by row, so row ``i`` has the same bytes whatever the chunking,
resumes or row count. They are also the same bytes on every machine: no value goes through a
float32 BLAS product, whose last bits depend on the CPU's kernels and the thread count. Every
product is :func:`_matmul` (float64 products of integer-valued slices, which BLAS sums exactly
in any order) and every norm a :func:`math.fsum`. That is generator version 2; version 1 used
float32 BLAS products and ``numpy.linalg.qr``, so its bytes depended on the machine.

The ground truth (``w``, ``mix``; for ``gated`` also ``gates`` and
``block_region``) is saved in the store's ``truth`` group, and :func:`load_truth` reads it back.

>>> spec = SynthSpec(rows=600, d_in=16, d_out=24, kind="gated", noise=0.0, regions=2)
>>> store = synthesize("memory://doc-synth", spec, rows_per_chunk=256, overwrite=True)
>>> x, z = store.read(0, store.rows)
>>> truth = load_truth(store)
>>> store.rows, bool(np.allclose(truth.target(x), z, atol=1e-5))
(600, True)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import zarr

from prismoe_store.errors import DataError, IncompleteStoreError, StoreError, StoreFormatError
from prismoe_store.grid import GridSpec, is_pow2, plan_pipes
from prismoe_store.stores.formats import StoreOptions, create_chunked
from prismoe_store.stores.pairs import PairsStore
from prismoe_store.stores.verified import damaged_chunks, reading

Kind = Literal["linear", "gated"]
KINDS = ("linear", "gated")
# a label stored in every synthetic store (and compared on resume), not a module path: it keeps the name stores
# already carry; version 2: machine-independent arithmetic
GENERATOR, GENERATOR_VERSION = "prismoe_store.synth", 2
_GEN_BLOCK = 256  # rows per generation block (fixed: part of what a seed means)
_STREAM_TRUTH, _STREAM_ROWS = 0, 1  # random streams: (seed, stream[, block])
_MIX_SCALE, _MIX_DECAY = 3.0, 0.75  # scale of the first correlated direction, ratio to the next
_TRUTH_CHUNK_BYTES = 1 << 24  # truth/w is stored in row bands of at most this many bytes
_SLICE_BITS = 18  # _matmul: bits per slice (two slices: 36 bits below each row's largest value)
_EXACT_K = 1 << (53 - 2 * _SLICE_BITS)  # _matmul: inner length whose integer sums float64 holds exactly
_BAND_VALUES = 1 << 22  # _matmul: values of b split at a time (bounds its float64 copies)
_TARGET_VALUES = 1 << 22  # generate: rows per target product × width (bounds its float64 arrays)


@dataclass(frozen=True)
class SynthSpec:
    """What to synthesize; every field but ``rows`` is part of what the pairs are.

    >>> SynthSpec(rows=10, d_in=4, d_out=3).kind
    'linear'
    """

    rows: int  # S: pairs to write (disk is the only limit)
    d_in: int  # M: width of x
    d_out: int  # N: width of z
    kind: Kind = "linear"  # "linear": one matrix; "gated": a region-dependent block-sparse matrix
    noise: float = 0.01  # σ of the Gaussian noise on z (the clean target has unit-scale entries)
    seed: int = 0  # seeds the ground truth and every row
    regions: int = 4  # gated: regions (gating directions); each owns a 1/regions share of the blocks
    workers: int = 512  # gated: workers per pipe of the plan_pipes grids the blocks align with
    correlated: int = 4  # strong correlated directions in x (0: isotropic x)

    def __post_init__(self) -> None:
        for name in ("rows", "d_in", "d_out", "regions", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if self.kind not in KINDS:
            raise DataError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.noise, (int, float)) and np.isfinite(self.noise) and self.noise >= 0):
            raise DataError(f"noise must be a finite number >= 0, got {self.noise!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DataError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not is_pow2(self.workers):
            raise DataError(f"workers must be a power of 2, got {self.workers!r}")
        if not isinstance(self.correlated, int) or isinstance(self.correlated, bool) or self.correlated < 0:
            raise DataError(f"correlated must be an integer >= 0, got {self.correlated!r}")
        if self.kind == "gated":
            blocks = int(np.prod(_block_grid(self)[0]))
            if self.regions > blocks:
                raise DataError(f"a gated {self.d_in}→{self.d_out} target has {blocks} blocks, "
                                f"fewer than regions={self.regions}: use fewer regions")

    def provenance(self) -> dict:
        """The settings as the store's provenance record (``rows`` is what was asked for).

        >>> SynthSpec(rows=5, d_in=2, d_out=2).provenance()["generator_version"]
        2
        """
        return {"source": "synth", "generator": GENERATOR, "generator_version": GENERATOR_VERSION,
                "dtype": "float32", **asdict(self)}


@dataclass(frozen=True, eq=False)
class SynthTruth:
    """The ground truth behind synthetic pairs (see the module docstring for the construction)."""

    w: np.ndarray  # [d_out, d_in] float32: the linear map (gated: every region's blocks together)
    mix: np.ndarray  # [correlated, d_in] float32: x = g + h @ mix with g, h standard normal
    gates: np.ndarray | None = None  # gated: [regions, d_in] orthonormal gating directions
    block_region: np.ndarray | None = None  # gated: [block_rows, block_cols] region owning each block
    block_shape: tuple[int, int] | None = None  # gated: (rows, columns) of one block

    @property
    def kind(self) -> Kind:
        """``"gated"`` when there are gating directions, else ``"linear"``."""
        return "linear" if self.gates is None else "gated"

    @property
    def regions(self) -> int:
        """Number of regions (1 for ``linear``)."""
        return 1 if self.gates is None else self.gates.shape[0]

    def region(self, x: np.ndarray) -> np.ndarray:
        """The region of each row of ``x`` (``argmax x·gates``; all 0 for ``linear``).

        >>> t = make_truth(SynthSpec(rows=1, d_in=16, d_out=24, kind="gated", regions=2))
        >>> t.region(np.stack([t.gates[1], t.gates[0]])).tolist()
        [1, 0]
        """
        x = np.asarray(x, dtype=np.float32)
        if self.gates is None:
            return np.zeros(x.shape[0], dtype=np.int64)
        return np.argmax(_matmul(x, self.gates.T), axis=1)

    def target(self, x: np.ndarray) -> np.ndarray:
        """The clean target ``z`` (no noise) for inputs ``x [n, d_in]``, float32.

        >>> t = make_truth(SynthSpec(rows=1, d_in=4, d_out=3, seed=1))
        >>> bool(np.array_equal(t.target(np.eye(4, dtype=np.float32)), t.w.T))
        True
        """
        x = np.asarray(x, dtype=np.float32)
        if self.gates is None:
            return _matmul(x, self.w.T).astype(np.float32)
        d_out, d_in = self.w.shape
        assert self.block_shape is not None and self.block_region is not None, "a gated truth has blocks"
        bo, bi = self.block_shape
        regions = self.region(x)[:, None]
        block_row = np.arange(d_out) // bo  # the block row of each output
        z = np.zeros((x.shape[0], d_out))
        for cb in range(self.block_region.shape[1]):  # one product per block column, masked by region
            cols = slice(cb * bi, min((cb + 1) * bi, d_in))
            part = _matmul(x[:, cols], self.w[:, cols].T)
            np.add(z, part, out=z, where=self.block_region[block_row, cb][None, :] == regions)
        return z.astype(np.float32)

    def worker_regions(self, grid: GridSpec) -> np.ndarray:
        """For each worker of ``grid``, the region whose target uses its tile (-1: padding only).

        Every tile of the default pipe grids lies inside one block; a grid whose tiles straddle
        blocks raises :class:`DataError`. For ``linear`` every real tile is region 0's.

        >>> t = make_truth(SynthSpec(rows=1, d_in=16, d_out=24, kind="gated", regions=2))
        >>> sorted(set(t.worker_regions(plan_pipes(16, 24)[2]).tolist()))
        [-1, 0, 1]
        """
        d_out, d_in = self.w.shape
        if (grid.d_in, grid.d_out) != (d_in, d_out):
            raise DataError(f"grid is {grid.d_in}→{grid.d_out}, the truth is {d_in}→{d_out}")
        out = np.full(grid.workers, -1, dtype=np.int64)
        bo, bi = self.block_shape or (grid.d_out_pad, grid.d_in_pad)
        for j, _r, _c in grid.iter_tiles():
            if grid.is_padding(j):
                continue
            rows, cols = grid.tile_region(j)
            rb, cb = rows.start // bo, cols.start // bi
            if (rows.stop - 1) // bo != rb or (cols.stop - 1) // bi != cb:
                raise DataError(f"tile {j} of {grid} straddles the truth's {bo}×{bi} blocks")
            out[j] = 0 if self.block_region is None else int(self.block_region[rb, cb])
        return out

    # -- storage -----------------------------------------------------------------------------
    def _save(self, group: zarr.Group, options: StoreOptions) -> None:
        # into ``group`` (a store's ``truth`` group), band by band; ``complete`` is set last
        d_out, d_in = self.w.shape
        band = max(1, min(d_out, _TRUTH_CHUNK_BYTES // (4 * d_in)))
        w = create_chunked(group, "w", (d_out, d_in), (band, d_in), "float32", options, overwrite=True)
        for start in range(0, d_out, band):
            w[start:start + band] = self.w[start:start + band]
        small = {"mix": self.mix, "gates": self.gates, "block_region": self.block_region}
        for name, arr in small.items():
            if arr is not None:
                a = create_chunked(group, name, arr.shape, tuple(max(1, n) for n in arr.shape), arr.dtype,
                                   options, overwrite=True)
                a[...] = arr
        group.attrs.update({"kind": self.kind, "block_shape": list(self.block_shape or []), "complete": True})

    @classmethod
    def _load(cls, group: zarr.Group, where: str = "") -> SynthTruth:
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            raise IncompleteStoreError(f"the ground truth in {where} is incomplete: re-run synth")
        with reading(f"the ground truth in {where}"):
            arrays = {name: group[name][...] for name in ("w", "mix", "gates", "block_region") if name in group}
        shape = attrs.get("block_shape") or None
        return cls(arrays["w"], arrays["mix"], arrays.get("gates"), arrays.get("block_region"),
                   tuple(shape) if shape else None)


def _block_grid(spec: SynthSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((block_rows, block_cols), (block_out, block_in))`` of the gated target's blocks."""
    grids = plan_pipes(spec.d_in, spec.d_out, spec.workers)
    bo, bi = max(g.tile_out for g in grids), max(g.tile_in for g in grids)
    return (-(-spec.d_out // bo), -(-spec.d_in // bi)), (bo, bi)


def make_truth(spec: SynthSpec) -> SynthTruth:
    """The ground truth for ``spec``: the same arrays for the same settings, whatever ``rows``.

    >>> make_truth(SynthSpec(rows=1, d_in=4, d_out=3, seed=1)).w.shape
    (3, 4)
    """
    rng = np.random.default_rng([spec.seed, _STREAM_TRUTH])
    w = np.empty((spec.d_out, spec.d_in), dtype=np.float32)
    rng.standard_normal(dtype=np.float32, out=w)  # in place: no float64 copy of a big matrix
    w *= np.float32(1.0 / np.sqrt(spec.d_in))
    k = spec.correlated
    mix = rng.standard_normal((k, spec.d_in))
    scale = _MIX_SCALE
    for i in range(k):  # unit rows scaled by 3, 2.25, 1.6875, ...
        mix[i] *= scale / _norm(mix[i])
        scale *= _MIX_DECAY
    mix = mix.astype(np.float32)
    if spec.kind == "linear":
        return SynthTruth(w, mix)
    (rb, cb), shape = _block_grid(spec)
    e = spec.regions
    g = rng.standard_normal((e, spec.d_in))
    gates = (_orthonormal_rows(g) if e <= spec.d_in else g / np.array([[_norm(r)] for r in g])).astype(np.float32)
    owner = np.empty(rb * cb, dtype=np.int16)
    owner[rng.permutation(rb * cb)] = np.arange(rb * cb) % e  # balanced: each region owns ⌊B/E⌋ or ⌈B/E⌉
    return SynthTruth(w, mix, np.ascontiguousarray(gates), owner.reshape(rb, cb), shape)


def generate(spec: SynthSpec, truth: SynthTruth, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of the pairs as ``(x, z)`` float32, the same bytes however they are cut.

    >>> spec = SynthSpec(rows=1000, d_in=8, d_out=5)
    >>> t = make_truth(spec)
    >>> x1, _ = generate(spec, t, 0, 700)
    >>> x2, _ = generate(spec, t, 300, 900)
    >>> bool((x1[300:] == x2[:400]).all())
    True
    """
    if not 0 <= start <= stop:
        raise DataError(f"bad row range {start}:{stop}")
    x = np.empty((stop - start, spec.d_in), dtype=np.float32)
    z = np.empty((stop - start, spec.d_out), dtype=np.float32)
    first, end = start // _GEN_BLOCK, -(-stop // _GEN_BLOCK)
    per = max(1, _TARGET_VALUES // (_GEN_BLOCK * max(spec.d_in, spec.d_out)))  # blocks per target product
    for b0 in range(first, end, per):
        b1 = min(b0 + per, end)
        lo, hi = b0 * _GEN_BLOCK, b1 * _GEN_BLOCK
        bx, bz = _blocks(spec, truth, b0, b1)
        a, b = max(lo, start), min(hi, stop)
        x[a - start:b - start] = bx[a - lo:b - lo]
        z[a - start:b - start] = bz[a - lo:b - lo]
    return x, z


def _blocks(spec: SynthSpec, truth: SynthTruth, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
    """Generation blocks ``b0:b1``; each block's rows come from its own random stream, and the
    products are row by row exact (:func:`_matmul`), so batching blocks does not change a bit."""
    n = (b1 - b0) * _GEN_BLOCK
    x = np.empty((n, spec.d_in), dtype=np.float32)
    h = np.empty((n, spec.correlated), dtype=np.float32)
    eps = np.empty((n, spec.d_out), dtype=np.float32) if spec.noise > 0 else None
    for i, block in enumerate(range(b0, b1)):
        rng = np.random.default_rng([spec.seed, _STREAM_ROWS, block])
        rows = slice(i * _GEN_BLOCK, (i + 1) * _GEN_BLOCK)
        rng.standard_normal(dtype=np.float32, out=x[rows])
        if spec.correlated:
            rng.standard_normal(dtype=np.float32, out=h[rows])
        if eps is not None:
            rng.standard_normal(dtype=np.float32, out=eps[rows])
    if spec.correlated:
        x = (x + _matmul(h, truth.mix)).astype(np.float32)  # rounded once, from float64
    z = truth.target(x)
    if eps is not None:
        eps *= np.float32(spec.noise)
        z += eps
    return x, z


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (float64) with the same bits on every machine, whatever its BLAS, CPU or threads.

    Each row of ``a`` and each column of ``b`` is scaled by a power of 2 to ``|·| < 1`` and cut
    into two integer-valued slices of :data:`_SLICE_BITS` bits (``v ≈ s·(hi·2^β + lo)·2^-2β``;
    what lies more than 36 bits below the row's largest value is dropped, deterministically).
    The products ``hi·hi`` and ``hi·lo + lo·hi`` are float64 matrix products of integers whose
    every partial sum is an integer below 2^53, so BLAS computes them exactly in any order, with
    or without FMA; the rest is elementwise arithmetic in a fixed order. About three float64
    products' time: for synthetic data, not for the fit.

    >>> a = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    >>> _matmul(a, a.T).tolist()
    [[6.25, -5.625], [-5.625, 9.0625]]
    """
    a, b = np.asarray(a), np.asarray(b)
    n, k = a.shape
    m = b.shape[1]
    if not (n and m and k):
        return np.zeros((n, m))
    a_hi, a_lo, a_scale = _slices(a, axis=1)
    a_scale *= 2.0 ** (-2 * _SLICE_BITS)  # powers of 2: every scaling below is exact
    band = max(1, _BAND_VALUES // k)  # columns of b at a time
    out = None if band >= m else np.empty((n, m))
    for c0 in range(0, m, band):
        b_hi, b_lo, b_scale = _slices(b[:, c0:c0 + band], axis=0)
        acc = None
        for k0 in range(0, k, _EXACT_K):  # inner chunks short enough for exact integer sums
            ks = slice(k0, k0 + _EXACT_K)
            cross = a_hi[:, ks] @ b_lo[ks]
            cross += a_lo[:, ks] @ b_hi[ks]  # both exact integers: their sum is exact too
            cross *= 2.0 ** -_SLICE_BITS
            part = a_hi[:, ks] @ b_hi[ks]
            part += cross  # the one rounding of this chunk
            if acc is None:
                acc = part
            else:
                acc += part
        acc *= a_scale
        acc *= b_scale
        if out is None:
            return acc
        out[:, c0:c0 + band] = acc
    assert out is not None, "one band (out None) returned inside the loop"
    return out


def _slices(v: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hi, lo, scale)`` with ``v ≈ scale·(hi·2^β + lo)·2^-2β`` (see :func:`_matmul`): ``scale``
    a power of 2 per line along ``axis`` (``|v/scale| < 1``), ``|hi| ≤ 2^β``, ``|lo| ≤ 2^(β-1)``."""
    v = np.asarray(v, dtype=np.float64)
    peak = np.max(np.abs(v), axis=axis, keepdims=True)
    scale = np.ldexp(1.0, np.frexp(peak)[1])  # the power of 2 just above the line's largest value
    u = v / scale  # exact: a power of 2
    hi = np.rint(u * 2.0 ** _SLICE_BITS)
    lo = u - hi * 2.0 ** -_SLICE_BITS  # exact: |lo| ≤ 2^-(β+1), on the grid of u's last bit or 2^-β
    lo *= 2.0 ** (2 * _SLICE_BITS)
    np.rint(lo, out=lo)
    return hi, lo, scale


def _norm(v: np.ndarray) -> float:
    """The Euclidean norm of a vector from a correctly rounded sum (the same bits everywhere)."""
    v = np.asarray(v, dtype=np.float64).ravel()
    return math.sqrt(math.fsum((v * v).tolist()))


def _orthonormal_rows(g: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the rows of ``g`` (``[e, d]``, ``e ≤ d``): Gram–Schmidt, twice, with
    :func:`math.fsum` dot products, so the bits do not depend on LAPACK or BLAS.

    >>> q = _orthonormal_rows(np.random.default_rng(0).standard_normal((3, 5)))
    >>> bool(np.allclose(q @ q.T, np.eye(3)))
    True
    """
    q = np.array(g, dtype=np.float64)
    for i in range(q.shape[0]):
        for _ in range(2):  # a second pass restores orthogonality lost to cancellation
            for j in range(i):
                q[i] -= math.fsum((q[i] * q[j]).tolist()) * q[j]
        q[i] /= _norm(q[i])
    return q


def synthesize(url, spec: SynthSpec, *, rows_per_chunk: int = 2048, options: StoreOptions | None = None,
               overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> PairsStore:
    """Write ``spec.rows`` synthetic pairs and their ground truth to a new pairs store at ``url``.

    Rows go in whole row chunks, each committed before the next is made, so memory holds one
    chunk plus the ground truth and the row count is limited only by disk. Re-running on a store
    that holds fewer rows with the same settings resumes (or extends it to a larger ``rows``),
    keeping the store's chunking; other settings need ``overwrite``.

    >>> s = synthesize("memory://doc-synth2", SynthSpec(rows=300, d_in=4, d_out=3), overwrite=True)
    >>> s.rows, s.provenance["kind"]
    (300, 'linear')
    """
    options = options or StoreOptions()
    store = None if overwrite else _open_for_resume(url, spec, options)
    if store is None:
        store = PairsStore.create(url, d_in=spec.d_in, d_out=spec.d_out, rows_per_chunk=rows_per_chunk,
                                  options=options, provenance=spec.provenance(), overwrite=overwrite)
    truth = make_truth(spec)
    group = store.group.require_group("truth")
    if not group.attrs.get("complete") or _truth_damaged(group):
        truth._save(group, options)
    for s0, s1 in store.damaged_rows():  # resuming: rows a damaged chunk held are made again, bit for bit
        store.rewrite(s0, *generate(spec, truth, s0, s1))
    start, rpc = store.rows, store.rows_per_chunk
    if progress:
        progress(min(start, spec.rows), spec.rows)
    while start < spec.rows:
        stop = min((start // rpc + 1) * rpc, spec.rows)  # whole chunks (after a foreign, unaligned tail)
        x, z = generate(spec, truth, start, stop)
        last = stop == spec.rows
        start = store.append(x, z, provenance={"rows": spec.rows} if last else None)
        del x, z
        if progress:
            progress(start, spec.rows)
    return store


def _truth_damaged(group: zarr.Group) -> bool:
    """True when a chunk of a saved ground truth is missing or does not match its record."""
    for _, arr in group.arrays():
        grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
        if damaged_chunks(arr, itertools.product(*grid)):
            return True
    return False


def _open_for_resume(url, spec: SynthSpec, options: StoreOptions) -> PairsStore | None:
    """The existing store at ``url`` when it was made with ``spec``'s settings; ``None`` when
    there is no store; an error when there is another store or other settings."""
    try:
        store = PairsStore.open(url, "r+", storage_options=options.storage_options)
    except StoreFormatError:
        raise
    except StoreError:
        return None  # nothing there (create() refuses anything else that is in the way)
    have = store.provenance
    want = spec.provenance()
    diff = [f"{k}={have.get(k)!r} (asked {v!r})" for k, v in want.items() if k != "rows" and have.get(k) != v]
    if diff:
        raise StoreError(f"{url} holds other pairs ({', '.join(diff)}): use --overwrite to replace them")
    return store


def truth_summary(store: PairsStore) -> dict | None:
    """Kind, matrix shape, regions and block shape of a store's ground truth, read from metadata
    only (``None`` when the store has none).

    >>> truth_summary(synthesize("memory://doc-synth3", SynthSpec(rows=1, d_in=4, d_out=3), overwrite=True))
    {'kind': 'linear', 'w': [3, 4], 'regions': 1, 'block_shape': None, 'complete': True}
    """
    if "truth" not in store.group:
        return None
    group = store.group["truth"]
    attrs = dict(group.attrs)
    return {"kind": attrs.get("kind"), "w": list(group["w"].shape) if "w" in group else None,
            "regions": group["gates"].shape[0] if "gates" in group else 1,
            "block_shape": attrs.get("block_shape") or None, "complete": bool(attrs.get("complete"))}


def load_truth(store: PairsStore) -> SynthTruth:
    """The ground truth saved beside synthetic pairs (:class:`StoreError` for other pairs)."""
    if "truth" not in store.group:
        raise StoreError(f"{store.url} has no ground truth (it was not made by synth)")
    return SynthTruth._load(store.group["truth"], store.url)
