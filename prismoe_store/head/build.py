"""Build a head adapter straight from a matrix (``prismoe head``): no pairs, no fit.

The matrix ``W [V, d]`` (an ``lm_head``, an embedding table, or an adapter's combined matrix)
becomes band tiles in the ``partition`` layout (:func:`~prismoe_store.grid.plan_partition`):
each band is ``band_rows`` whole rows of ``W``, so a selected band yields exact logits. The rows
are first put in a vocabulary order (:mod:`prismoe_store.head.vocab_order`) so that a band holds
tokens that win together; the order is stored and the runtime returns logits in token order.
The band gate starts from the band centroids — ``s_b(x) = x · mean_{v∈b} w_v + log |b|``, a
lower bound of the band's log-sum-exp ``log Σ_{v∈b} exp(x · w_v)`` by Jensen's inequality — so
it is useful before any training (``prismoe fit-gates`` then trains it).

Streaming: one pass copies the matrix, in row blocks, into a raw float32 scratch file (the
source may be a GGUF, safetensors or a store; the scratch gives cheap random row access); the
clustering streams that file; each band is then gathered from it with ``pread`` and written as
one chunk. Memory holds a block of rows, never the matrix. Bands finished are recorded in the
store's progress record, so an interrupted build re-run with the same command writes only the
rest.

>>> import numpy as np, tempfile, os
>>> d = tempfile.mkdtemp()
>>> w = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
>>> np.save(os.path.join(d, "w.npy"), w)
>>> report = build_head(os.path.join(d, "w.npy"), os.path.join(d, "head.zarr"), config=HeadConfig(band_rows=8))
>>> report.bands, report.stored_fp32_bytes == w.nbytes
(5, True)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import numpy as np

from prismoe_store.errors import CorruptStoreError, DataError, PrismoeError, StoreError, StoreFormatError
from prismoe_store.grid import default_band_rows, next_pow2
from prismoe_store.head.scratch_rows import ScratchRows
from prismoe_store.head.vocab_order import OrderConfig, band_sizes, cluster_order, hidden_metric, identity_order
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import StoreOptions, describe_kind, existing_kind, store_exists
from prismoe_store.stores.progress import recheck
from prismoe_store.stores.training_state import STATE_GROUP

ProgressFn = Callable[[int, int], None]
Stages = Callable[[str], AbstractContextManager[ProgressFn | None]]  # stage name -> progress callback


@dataclass(frozen=True)
class HeadConfig:
    """What head adapter to build.

    >>> HeadConfig(bands=0)
    Traceback (most recent call last):
    ...
    prismoe_store.errors.DataError: bands must be a positive integer, got 0
    """

    tensor: str | None = "lm_head"  # tensor name or alias in a checkpoint / weights store (None: the only matrix)
    band_rows: int | None = None  # rows per band (a power of 2); None: from `bands`, else 64 (fewer for tiny heads)
    bands: int | None = None  # about how many bands (sets band_rows = next_pow2(ceil(V / bands)))
    order: OrderConfig = field(default_factory=OrderConfig)  # vocabulary order: clustered or token ids
    int8: bool = False  # also write INT8 tiles with per-row scales
    options: StoreOptions = field(default_factory=StoreOptions)  # chunk encoding of the adapter
    scratch_dir: str | None = None  # where the float32 scratch copy of the matrix goes (None: the temp dir)
    hidden: str | None = None  # hidden states (pairs store or .npy) whose metric the cluster order uses
    hidden_rows: int = 65536  # at most this many of them

    def __post_init__(self) -> None:
        for name in ("band_rows", "bands"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if self.band_rows is not None and self.bands is not None:
            raise DataError("give band_rows or bands, not both")

    def rows_per_band(self, rows: int) -> int:
        """The band height for a head of ``rows`` rows."""
        if self.band_rows is not None:
            return self.band_rows
        if self.bands is not None:
            return min(next_pow2(-(-rows // self.bands)), 1 << (rows.bit_length() - 1))
        return default_band_rows(rows)


@dataclass(frozen=True)
class HeadReport:
    """What :func:`build_head` made."""

    url: str  # the adapter store
    source: str  # "path:tensor" of the matrix
    d_in: int  # hidden width d
    d_out: int  # rows V
    band_rows: int  # rows per band
    bands: int  # number of bands
    pipe_rows: list[int]  # rows per pipe of the partition layout
    order: str  # "cluster" or "identity"
    cohesion: float  # mean cosine of a row with its band centroid (NaN for identity order)
    matrix_bytes: int  # the source matrix as float32, V · d · 4
    stored_fp32_bytes: int  # true bytes of the float32 tiles (equal to matrix_bytes: nothing padded or copied)
    gate_bytes: int  # the band gate, float32 [bands, d] + [bands]
    int8_bytes: int | None  # INT8 tiles + float32 scales, when written
    bands_written: int  # bands this call wrote (fewer than `bands` when resuming)
    seconds: float  # wall time
    already_finished: bool = False  # the output already held this head, finished: this call wrote nothing
    bands_repaired: int = 0  # of bands_written, those recorded as written before but found damaged or missing
    gate_rewritten: bool = False  # the finished head's (untrained) centroid gate was lost or damaged: written again
    gate_trained: bool = False  # the head's band gate was trained (`prismoe fit-gates`): the next step is using it
    hidden: str | None = None  # the hidden-state rows the vocabulary order used (--hidden), for the next step
    model: str | None = None  # the source, when it is a model `prismoe generate --model` runs (for the next step)
    tied: str | None = None  # the head asked for is tied to the tensor read (e.g. lm_head to token_embd.weight)

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)

    def text(self) -> str:
        """What was built (and a tied head's note), its bytes against the matrix, and the next step."""
        ratio = self.stored_fp32_bytes / self.matrix_bytes
        done = (f"already finished, nothing to do (--overwrite rebuilds it): {self.url} holds" if self.already_finished
                else f"wrote {self.url}:")
        if self.already_finished and self.gate_rewritten:
            done = (f"already finished, but its band gate was missing or damaged: the centroid gate is written "
                    f"again; {self.url} holds")
        lines = [f"{done} {self.source} ({self.d_out} × {self.d_in}) as {self.bands} bands of "
                 f"{self.band_rows} rows in {len(self.pipe_rows)} pipes {self.pipe_rows}, {self.order} order"
                 + (f" (cohesion {self.cohesion:.3f})" if self.order == "cluster" else "")
                 + ("" if self.already_finished
                    else f", {self.bands_written} bands written, {self.seconds:.1f} s in all")
                 + (f" ({self.bands_repaired} found damaged, written again)" if self.bands_repaired else "")
                 + (f"\n({self.tied})" if self.tied else ""),
                 f"bytes: tiles {self.stored_fp32_bytes / 2**20:.1f} MiB fp32 = {ratio:.3f}× the matrix; "
                 f"gate {self.gate_bytes / 2**20:.2f} MiB ({self.gate_bytes / self.matrix_bytes:.4f}×)"
                 + (f"; INT8 tiles + scales {self.int8_bytes / 2**20:.1f} MiB "
                    f"({self.int8_bytes / self.matrix_bytes:.3f}×)" if self.int8_bytes else ""),
                 f"next (its band gate is trained): prismoe benchmark head {self.url} HELD_OUT_HIDDEN   (hidden "
                 f"states of other text than the gate trained on), or prismoe generate {self.url} --model "
                 f"{self.model or 'MODEL'} --prompt TEXT --compare" if self.gate_trained
                 else f"next: prismoe fit-gates {self.url} {self.hidden}" if self.hidden
                 else f"next: prismoe fit-gates {self.url} HIDDEN   (hidden states: prismoe collect --target none ...)"]
        return "\n".join(lines)


def build_head(source, output, *, config: HeadConfig = HeadConfig(), overwrite: bool = False,
               stages: Stages | None = None) -> HeadReport:
    """Build a head adapter at ``output`` from the matrix at ``source`` (see the module docstring).

    ``source`` is anything :func:`prismoe_store.inspection.compare.open_matrix` reads (a checkpoint file or
    folder, a ``.npy``, a weights store; ``config.tensor`` names the tensor or an alias) or an
    adapter store (its combined matrix). Re-running over an unfinished head adapter built from
    the same matrix with the same settings finishes it; over a finished one it does nothing and
    says so (``report.already_finished``). Raises :class:`StoreError` when ``output`` holds anything
    else (another head, another store, other files) without ``overwrite``, :class:`DataError` for a
    matrix holding NaN/Inf, and the source readers' errors for unreadable checkpoints.
    """
    t0 = time.perf_counter()
    stage = stages or (lambda name: contextlib.nullcontext(None))
    matrix, label, tied = _open_source(source, config.tensor)
    V, d = (int(n) for n in matrix.shape)
    band_rows = config.rows_per_band(V)
    adapter, resume = _open_output(output, d, V, band_rows, label, config, overwrite)
    damaged = _recheck_bands(adapter)  # bands recorded as written whose chunk is missing or damaged: redone
    if adapter.complete:
        gate_rewritten = _recheck_gate(adapter)  # a trained gate that is lost or damaged is refused here
        if not damaged:  # the same command ran to the end before: nothing to do, like collect, extract, synth
            cohesion = float(adapter.attrs()["head"].get("cohesion", float("nan")))
            return _report(adapter, output, label, config, cohesion, written=0, t0=t0, finished=True,
                           gate_rewritten=gate_rewritten, source=source, tied=tied)
        adapter.update_attrs(complete=False)  # not served while its damaged bands are written again

    with tempfile.TemporaryDirectory(prefix="prismoe-head-", dir=config.scratch_dir) as scratch:
        rows = ScratchRows(os.path.join(scratch, "rows.f32"), V, d)
        with stage("read matrix") as progress:
            rows.fill(matrix, progress)
        if resume:
            order, cohesion = adapter.read_order(), float(adapter.attrs()["head"].get("cohesion", float("nan")))
        else:
            metric = None
            if config.hidden is not None and config.order.method == "cluster":
                from prismoe_store.stores.pairs import open_rows

                read_hidden, n_hidden = open_rows(config.hidden, d, config.hidden_rows)
                metric = hidden_metric(read_hidden, n_hidden, d)
            with stage("order vocabulary") as progress:
                result = (cluster_order(rows.read, V, d, band_rows=band_rows, config=config.order, metric=metric,
                                        progress=progress, scratch=scratch)
                          if config.order.method == "cluster" else identity_order(V))
            order, cohesion = result.order, result.cohesion
            adapter.write_order(order)
            adapter.update_attrs(head={**adapter.attrs()["head"], "cohesion": cohesion,
                                       "order_seconds": result.seconds})
        written = _write_bands(adapter, rows, order, stage)
    _write_centroid_gate(adapter)
    if config.int8:
        from prismoe_store.runtime.quant import quantize_adapter

        with stage("quantize") as progress:
            quantize_adapter(adapter, progress=progress)
    adapter.update_attrs(complete=True)
    return _report(adapter, output, label, config, cohesion, written=written, t0=t0, repaired=len(damaged),
                   source=source, tied=tied)


def _recheck_bands(adapter: AdapterStore) -> list[int]:
    """Bands recorded as written whose tile chunk is missing, unrecorded or damaged, recorded as not
    written again (each written band's chunk is read once)."""
    def chunks(band: int):
        p, r = adapter.band_location(band)
        tiles = adapter.tiles(p)
        return [(tiles, (r, c)) for c in range(-(-tiles.shape[1] // tiles.chunks[1]))]

    return recheck(adapter.progress("head_bands", adapter.n_bands), chunks)


def stored_band_gate(adapter: AdapterStore) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored band gate, read whole (checksums and all); ``None`` when there is none or when an
    untrained (centroid) gate was lost or damaged — it is computed again. A trained gate lost or
    damaged raises the reader's :class:`~prismoe_store.errors.CorruptStoreError`, which names
    ``prismoe fit-gates --restart``."""
    try:
        return adapter.read_band_gate()
    except CorruptStoreError:
        if adapter.gates_record() is not None:
            raise
        return None


def _recheck_gate(adapter: AdapterStore) -> bool:
    """A finished head's band gate is read back whole; a lost or damaged centroid gate is written
    again (True), a trained one is refused (:func:`stored_band_gate`)."""
    if stored_band_gate(adapter) is not None:
        return False
    adapter.write_band_gate(*centroid_gate(adapter))
    return True


def _report(adapter: AdapterStore, output, label: str, config: HeadConfig, cohesion: float, *, written: int,
            t0: float, finished: bool = False, repaired: int = 0, gate_rewritten: bool = False,
            source=None, tied: str | None = None) -> HeadReport:
    V, d, band_rows = adapter.d_out, adapter.d_in, adapter.band_rows
    trained = adapter.gates_record() is not None
    sizes = band_sizes(V, band_rows)
    return HeadReport(url=str(output), source=label, d_in=d, d_out=V, band_rows=band_rows, bands=len(sizes),
                      pipe_rows=[g.d_out for g in adapter.grids], order=config.order.method, cohesion=cohesion,
                      matrix_bytes=4 * V * d, stored_fp32_bytes=4 * V * d, gate_bytes=4 * len(sizes) * (d + 1),
                      int8_bytes=V * d + 4 * V if config.int8 else None, bands_written=written,
                      seconds=time.perf_counter() - t0, already_finished=finished, bands_repaired=repaired,
                      gate_rewritten=gate_rewritten, gate_trained=trained,
                      model=_runnable_model(source) if trained else None,
                      hidden=None if config.hidden is None else str(config.hidden), tied=tied)


# -- the source ---------------------------------------------------------------------------------


def _runnable_model(source) -> str | None:
    """``source`` when ``prismoe generate --model`` can load it (a ``.gguf``, a model folder), else None."""
    from prismoe_store.data.models import check_model_paths

    try:
        check_model_paths(os.fspath(source))
    except (PrismoeError, TypeError):
        return None
    return os.fspath(source)


def _open_source(source, tensor: str | None):
    """``(matrix, label, tied)``: a ``[V, d]`` object sliced by rows, ``"path:tensor"``, and a note
    when the name asked for is tied to another tensor (a head without a tensor of its own)."""
    from prismoe_store.inspection.compare import is_store, open_matrix

    if is_store(source):
        from prismoe_store.inspection.common import store_format

        if store_format(source) == "adapter":  # what the adapter computes with every tile (float64 sums)
            from prismoe_store.runtime.dense import DenseView

            return DenseView(AdapterStore.open(source, require_complete=True)), f"{source}:combined", None
        if tensor is not None:  # an alias in a weights store: the one tensor named like it
            from prismoe_store.stores.weights import WeightsStore

            names = WeightsStore.open(source).tensors()
            like = [n for n in names if n == f"{tensor}.weight" or n.endswith(f".{tensor}.weight")]
            if tensor not in names and len(like) == 1:
                tensor = like[0]
    opened = open_matrix(source, tensor=tensor)
    if len(opened.shape) != 2:
        raise DataError(f"{opened.label} is not a matrix: shape {opened.shape}")
    _refuse_bias(source, tensor, opened)
    return opened.array, opened.label, opened.note


def _refuse_bias(source, tensor: str | None, opened) -> None:
    """A head adapter holds ``x Wᵀ`` only: refuse a head whose checkpoint adds a bias (Phi-2, GPT-J)."""
    from prismoe_store.inspection.compare import is_store

    if is_store(source):
        from prismoe_store.stores.weights import WeightsStore

        bias = WeightsStore.open(source).bias(opened.name)
    else:
        src = opened.array.source  # the opened checkpoint behind the lazy matrix
        bias = src.bias_of(src.resolution(tensor or opened.name))
    if bias is not None:
        where = bias if isinstance(bias, str) else "stored"
        raise DataError(f"{opened.label} has a bias added to its outputs ({where}): "
                        "head adapters hold x Wᵀ only and would drop it; this head cannot be served sparsely yet")


# -- the output ---------------------------------------------------------------------------------


def _open_output(output, d: int, V: int, band_rows: int, label: str, config: HeadConfig, overwrite: bool
                 ) -> tuple[AdapterStore, bool]:
    """``(adapter, resume)``: a new head adapter, or the unfinished one of an earlier run to finish."""
    AdapterStore.check_output(output, "partition", storage_options=config.options.storage_options)  # not a fit
    want = {"source": label, "band_rows": band_rows, "order": asdict(config.order), "int8": config.int8,
            "hidden": None if config.hidden is None else str(config.hidden), "hidden_rows": config.hidden_rows}
    if not overwrite and store_exists(str(output)):
        try:
            old = AdapterStore.open(output, "r+")
            head = old.attrs().get("head") or {}
        except StoreError:
            kind = existing_kind(str(output))
            if kind == "adapter":  # another adapter: --overwrite replaces only adapters
                raise StoreError(f"{output} already exists and is not a head adapter "
                                 "(pass --overwrite to replace it)") from None
            what = describe_kind(kind or "folder")
            raise StoreFormatError(f"{output} already holds {what}, not a head adapter: refusing to touch it "
                                   "(--overwrite replaces only an adapter store); choose another output") from None
        differ = [k for k, v in want.items() if head.get(k) != v]
        if old.layout != "partition" or (old.d_in, old.d_out) != (d, V):
            differ.insert(0, f"shape {old.d_out} × {old.d_in}")
        if differ:
            raise StoreError(f"{output} already holds a head adapter built differently ({', '.join(differ)} "
                             "differ from this command's): pass --overwrite to replace it, or choose another output")
        return old, "cohesion" in head  # finished (the caller does nothing), or unfinished: resumed
    adapter = AdapterStore.create_partition(output, d_in=d, d_out=V, band_rows=band_rows, options=config.options,
                                            overwrite=overwrite, attrs={"head": want, "complete": False})
    return adapter, False


def _write_bands(adapter: AdapterStore, rows: ScratchRows, order: np.ndarray, stage) -> int:
    """Write every band not yet recorded as done; returns how many were written."""
    record = adapter.progress("head_bands", adapter.n_bands)
    missing = record.missing()
    a = adapter.band_rows
    with stage("write bands") as progress:
        for i, band in enumerate(missing):
            adapter.write_band_tiles(band, rows.gather(order[band * a:(band + 1) * a]))
            record.mark(band)
            if progress:
                progress(i + 1, len(missing))
    return len(missing)


def _write_centroid_gate(adapter: AdapterStore) -> None:
    """Store the centroid gate, unless a trained gate is there already (a resumed build keeps it). A
    trained gate found damaged is replaced, and its record and training state go with it (they would
    claim a trained gate): `prismoe fit-gates` trains it again."""
    if adapter.gates_record() is not None:
        try:
            if adapter.read_band_gate() is not None:
                return
        except CorruptStoreError:
            pass
        del adapter.group.attrs["gates"]
        if STATE_GROUP in adapter.group:
            del adapter.group[STATE_GROUP]
    adapter.write_band_gate(*centroid_gate(adapter))


def centroid_gate(adapter: AdapterStore) -> tuple[np.ndarray, np.ndarray]:
    """The band gate's initialisation ``(weight [n, d], bias [n])``: ``weight_b = mean_{v∈b} w_v``,
    ``bias_b = log |b|`` — ``x · weight_b + bias_b ≤ log Σ_{v∈b} exp(x · w_v)`` (Jensen)."""
    weight = np.empty((adapter.n_bands, adapter.d_in), np.float32)
    bias = np.empty(adapter.n_bands, np.float32)
    for b in range(adapter.n_bands):
        band = adapter.read_band_tiles(b)  # [rows, d]
        weight[b] = band.mean(axis=0, dtype=np.float64)
        bias[b] = np.log(len(band))
    return weight, bias
