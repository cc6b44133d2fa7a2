"""Extract 2-D tensors from real checkpoints into a weights store, streaming block by block.

The checkpoint is opened with :func:`~prismoe_store.sources.checkpoint.open_source` (safetensors, sharded
Hugging Face folders, PyTorch ``.pt``/``.bin``, GGUF files and split sets, ``.npy``). Each tensor
asked for is resolved with a reason (:mod:`prismoe_store.sources.resolve`: ``lm_head`` and
``embedding`` are aliases; the tied embedding stands in for a head only when the checkpoint says
so), and the choice is logged and recorded in the store (``source_resolution``). Values are
exact or refused: scaled FP8 is multiplied by its scales, GGUF quants are dequantized block by
block, and a down-cast that would overflow (``--dtype float16`` of a value above 65504) stops
the extraction with :class:`~prismoe_store.errors.CastOverflowError`. A head's bias
(``lm_head.bias``) is stored beside it (:meth:`~prismoe_store.stores.weights.WeightsStore.bias`).

Each stored tensor records its source — path, size and a content fingerprint
(:class:`~prismoe_store.sources.records.SourceStamp`) — and resuming it from a checkpoint with
other values is refused (:class:`~prismoe_store.errors.SourceMismatchError`) unless the store is
overwritten. Extraction holds at most about two blocks of ``block_bytes`` (default 16 MiB)
whatever the size of the matrix.

>>> import tempfile, numpy as np
>>> from prismoe_store.data.extract import extract
>>> with tempfile.TemporaryDirectory() as d:
...     w = np.arange(96, dtype=np.float32).reshape(12, 8)
...     np.save(f"{d}/head.npy", w)
...     store = extract(f"{d}/head.npy", "memory://doc-extract", workers=4, overwrite=True)
...     bool((store.read("lm_head") == w).all()), store.info("lm_head")["source_resolution"]["rule"]
(True, 'only tensor')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from prismoe_store.errors import (
    CastOverflowError,
    GridError,
    SourceError,
    SourceMismatchError,
    StoreError,
)
from prismoe_store.grid import DEFAULT_WORKERS, GridSpec, plan_grid
from prismoe_store.sources.base import Source
from prismoe_store.sources.checkpoint import open_source
from prismoe_store.sources.records import Resolution, SourceStamp, TensorInfo, parse_stamp
from prismoe_store.sources.resolve import ALIASES, resolve
from prismoe_store.stores.formats import StoreOptions, job_lock
from prismoe_store.stores.weights import TensorWriter, WeightsStore

__all__ = [
    "ALIASES",
    "BLOCK_BYTES",
    "Resolution",
    "Source",
    "TensorInfo",
    "extract",
    "open_source",
    "resolve",
    "tile",
]

Dtype = Literal["float32", "float16", "source"]
ProgressFn = Callable[[int, int], None]
BLOCK_BYTES = 16 * 2**20  # default size of one block of tiles (stored bytes); ~2 are in memory at once
log = logging.getLogger(__name__)


# -- extraction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    name: str  # the tensor's name in the store
    info: TensorInfo  # the source tensor it is copied from
    resolution: Resolution  # how the name asked for led to that tensor
    bias: str | None  # the source tensor added to its outputs (lm_head.bias), stored beside it
    stamp: SourceStamp  # the source's path, size and content fingerprint
    grid: GridSpec  # the tile grid (d_out = rows of the matrix, d_in = columns)
    dtype: str  # the dtype stored


def extract(
    source: str | os.PathLike | Source,
    store_url: str | os.PathLike,
    *,
    tensors: Sequence[str] | Mapping[str, str] = ("lm_head",),
    workers: int = DEFAULT_WORKERS,
    dtype: Dtype = "float32",
    options: StoreOptions | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    block_bytes: int = BLOCK_BYTES,
    allow_globals: Sequence[str] = (),
) -> WeightsStore:
    """Copy 2-D tensors of a checkpoint into a weights store, one tile per chunk, streaming.

    ``tensors`` are source names or aliases (``lm_head``, ``embedding``), each stored under the
    name asked for; a mapping ``{store_name: source_name}`` renames. Every name is resolved (and
    its source stamped) before the store is touched; each resolution is logged and recorded in the
    tensor's ``source_resolution`` attribute. Re-running into an existing store resumes: finished
    tiles are kept and only the missing ones are written — from the same source only (same
    content fingerprint), else :class:`SourceMismatchError`. ``dtype="source"`` keeps
    float16/float64 and stores other source types (bf16, fp8, GGUF quants, scaled) as float32.
    ``allow_globals`` goes to :func:`open_source` (PyTorch pickles).

    Raises :class:`~prismoe_store.errors.SourceError` (and its kinds: tensor not found, packed or
    unsafe checkpoint), :class:`SourceMismatchError`, :class:`CastOverflowError`.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     np.save(f"{d}/emb.npy", np.ones((8, 4), np.float32))
    ...     store = extract(f"{d}/emb.npy", "memory://doc-extract-2", tensors={"E": "embedding"},
    ...                     workers=2, overwrite=True)
    ...     store.grid("E").workers, store.read("E").shape
    (2, (8, 4))
    """
    src = source if isinstance(source, Source) else open_source(source, allow_globals=allow_globals)
    tensors = [tensors] if isinstance(tensors, str) else tensors
    wanted = dict(tensors) if isinstance(tensors, Mapping) else {t: t for t in tensors}
    if not wanted:
        raise SourceError("no tensor to extract was named")
    jobs = [_plan(src, src.resolution(source_name), name, workers, dtype) for name, source_name in wanted.items()]
    return _run(src, jobs, store_url, options=options, overwrite=overwrite, progress=progress,
                block_bytes=block_bytes)


def tile(
    matrix: str | os.PathLike,
    store_url: str | os.PathLike,
    *,
    name: str | None = None,
    workers: int = DEFAULT_WORKERS,
    dtype: Dtype = "float32",
    options: StoreOptions | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> WeightsStore:
    """Tile the one matrix of a ``.npy``/``.pt`` file into a weights store under ``name`` (default: file stem).

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     np.save(f"{d}/m.npy", np.eye(6, dtype=np.float32))
    ...     tile(f"{d}/m.npy", "memory://doc-tile", workers=4, overwrite=True).tensors()
    ['m']
    """
    src = open_source(matrix)
    matrices = [i.name for i in src.tensors().values() if i.is_matrix]
    if len(matrices) != 1:
        raise SourceError(f"{matrix} holds {len(matrices)} matrices, not one: use `prismoe extract --tensor NAME`")
    found = Resolution(matrices[0], matrices[0], "exact", f"the one matrix in {Path(str(matrix)).name}")
    job = _plan(src, found, name or Path(str(matrix)).stem, workers, dtype)
    return _run(src, [job], store_url, options=options, overwrite=overwrite, progress=progress,
                block_bytes=block_bytes)


def format_extract(store: WeightsStore, names: Sequence[str]) -> str:
    """What ``prismoe extract`` / ``prismoe tile`` print about the tensors ``names`` of ``store``: each
    one's source tensor, shape, dtypes and grid, the rule that chose it, its bias; then the store.

    >>> import tempfile, os, numpy as np
    >>> d = tempfile.mkdtemp(); np.save(os.path.join(d, "w.npy"), np.ones((4, 8), np.float32))
    >>> print(format_extract(tile(os.path.join(d, "w.npy"), "memory://doc-fmt-extract", workers=4,
    ...                           overwrite=True), ["w"]).splitlines()[0])
    w: w [4×8, float32] -> float32, 2×2 grid of 2×4 tiles (8→4)
    """
    lines = []
    for name in names:
        info = store.info(name)
        shape = "×".join(str(d) for d in info["source_shape"])
        lines.append(f"{name}: {info['source_tensor']} [{shape}, {info['source_dtype']}] -> {info['dtype']}, "
                     f"{store.grid(name)}")
        found = info.get("source_resolution")
        if found:
            lines.append(f"  chosen by {found['rule']}: {found['why']}")
        if info.get("source_bias"):
            lines.append(f"  bias {info['source_bias']} stored with it")
    lines.append(f"wrote {store.url}")
    return "\n".join(lines)


def _plan(src: Source, found: Resolution, name: str, workers: int, dtype: Dtype) -> _Job:
    if dtype not in ("float32", "float16", "source"):
        raise StoreError(f"dtype must be float32, float16 or source, got {dtype!r}")
    info = src.matrix(found.tensor)
    rows, cols = info.shape
    if rows == 0 or cols == 0:
        raise SourceError(f"tensor {info.name!r} in {src.path} is empty (shape {info.shape})")
    bias = src.bias_of(found)
    stored = src.stored_dtype(info.name) if dtype == "source" else dtype
    grid = plan_grid(cols, rows, workers)
    if grid.workers > rows * cols:  # mostly padding: a chunk (and a progress flag) each, for nothing
        raise GridError(f"{workers} tiles are too many for the {rows}×{cols} matrix {info.name!r} (more tiles than "
                        "it has entries): use fewer --workers")
    log.info("%s: %s%s", name, found.line(), f"; bias {bias}" if bias else "")
    return _Job(name, info, found, bias, src.stamp(info.name, bias), grid, stored)


def _run(src: Source, jobs: list[_Job], store_url, *, options, overwrite, progress, block_bytes) -> WeightsStore:
    if not isinstance(block_bytes, int) or block_bytes < 1:
        raise StoreError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    with job_lock(store_url):  # a second extract into this store fails at once, never mixes writes
        store = WeightsStore.create(store_url, options=options, overwrite=overwrite)
        writers = [_begin(store, src, job) for job in jobs]
        total = sum(w.progress.units for w in writers)
        done = total - sum(len(w.missing()) for w in writers)
        tick = _ticker(progress, done, total)
        for job, writer in zip(jobs, writers):
            _copy(src, job, writer, block_bytes, tick)
            if job.bias is not None:
                store.write_bias(job.name, src.read_array(job.bias).reshape(-1))
            writer.finish()
    return store


def _begin(store: WeightsStore, src: Source, job: _Job) -> TensorWriter:
    """Start or resume a tensor; resuming from another source tensor or other content is refused."""
    attrs = {"source_format": src.format, "source_tensor": job.info.name, "source_dtype": job.info.dtype,
             "source_shape": list(job.info.shape), "source_resolution": job.resolution.as_dict(),
             "source_bias": job.bias, **job.stamp.as_attrs()}
    if job.name in store.tensors(include_incomplete=True):
        _check_same_source(store, job, attrs)
    return store.begin(job.name, job.grid, dtype=job.dtype, source=attrs)


def _check_same_source(store: WeightsStore, job: _Job, attrs: dict) -> None:
    old = store.info(job.name)
    for key in ("source_tensor", "source_dtype", "source_shape", "source_bias"):
        if old.get(key) != attrs[key]:
            raise SourceMismatchError(f"{job.name!r} in {store.url} came from {key}={old.get(key)}, not {attrs[key]}: "
                                      "use another store or --overwrite")
    recorded = parse_stamp(old)
    if recorded is None:
        raise SourceMismatchError(
            f"{job.name!r} in {store.url} has no fingerprint of the checkpoint it came from ({old.get('source')}; "
            f"written by an older version), so resuming it from {job.stamp.path} could mix two checkpoints: "
            "use another store or --overwrite")
    if (recorded.fingerprint, recorded.method) != (job.stamp.fingerprint, job.stamp.method):
        raise SourceMismatchError(
            f"{job.name!r} in {store.url} was extracted from {recorded.path} ({recorded.size} bytes, "
            f"{recorded.fingerprint[:19]}…), and {job.stamp.path} holds other values for {job.info.name!r} "
            f"({job.stamp.size} bytes, {job.stamp.fingerprint[:19]}…): refusing to mix them; "
            "use another store or --overwrite")


def _ticker(progress: ProgressFn | None, done: int, total: int) -> Callable[[int], None]:
    state = {"done": done}
    if progress:
        progress(done, total)

    def tick(units: int) -> None:
        state["done"] += units
        if progress:
            progress(state["done"], total)

    return tick


class _Block(NamedTuple):
    row: int  # the band the tiles are in
    workers: list[int]  # neighbouring tiles of that band (all of them when sharded)
    rows: slice  # the true-matrix rows they cover (empty when pure padding)
    cols: slice  # the true-matrix columns they cover (empty when pure padding)

    @property
    def empty(self) -> bool:
        return self.rows.stop <= self.rows.start or self.cols.stop <= self.cols.start


def _copy(src: Source, job: _Job, writer: TensorWriter, block_bytes: int, tick: Callable[[int], None]) -> None:
    """Read the missing tiles block by block (the next read overlapping the current write)."""
    blocks = list(_blocks(writer, job.dtype, block_bytes))

    def read(i: int) -> np.ndarray | None:
        b = blocks[i]
        if b.empty:
            return None
        values = src.read(job.info.name, b.rows, b.cols)
        with np.errstate(over="ignore"):  # an overflow is refused just below, with its place
            data = values.astype(job.dtype, copy=False)
        if data is not values:
            _check_cast(values, data, job, b)
        return data

    for block, data in zip(blocks, _prefetched(read, len(blocks))):
        _write(writer, block, data)
        tick(1 if writer.sharded else len(block.workers))


def _check_cast(values: np.ndarray, cast: np.ndarray, job: _Job, block: _Block) -> None:
    """Refuse a down-cast that turned finite values into ±inf."""
    bad = ~np.isfinite(cast)
    if not bad.any():
        return
    bad &= np.isfinite(values)
    if bad.any():
        r, c = (int(i[0]) for i in np.nonzero(bad))
        value = float(values[r, c])
        raise CastOverflowError(
            f"{job.info.name}[{block.rows.start + r}, {block.cols.start + c}] = {value:g} does not fit {job.dtype} "
            f"(largest finite {float(np.finfo(job.dtype).max):g}): store it as float32 (--dtype float32 and "
            f"--overwrite); {job.name!r} is left incomplete in the store")


def _write(writer: TensorWriter, block: _Block, data: np.ndarray | None) -> None:
    """Write a block's tiles in one Zarr call (its chunks are encoded concurrently), then mark them."""
    if writer.sharded:
        writer.write_band(block.row, data if data is not None else np.zeros((0, 0), writer.array.dtype))
        return
    if data is not None:
        writer.array[block.rows, block.cols] = data  # whole chunks only: blocks are runs of whole tiles
    writer.progress.mark_many(block.workers)


def _blocks(writer: TensorWriter, dtype: str, block_bytes: int) -> Iterator[_Block]:
    """The missing tiles as runs of neighbours in one band, each at most ``block_bytes`` (whole
    bands when the store is sharded: a shard is written whole by one writer)."""
    grid = writer.grid
    if writer.sharded:
        runs: Iterable[list[int]] = ([grid.worker(r, c) for c in range(grid.cols)] for r in writer.missing())
    else:
        runs = _runs(writer.missing(), grid.cols, max(1, block_bytes // grid.tile_bytes(np.dtype(dtype).itemsize)))
    for run in runs:
        rows, first = grid.valid_region(run[0])
        last = grid.valid_region(run[-1])[1]
        yield _Block(run[0] // grid.cols, run, rows, slice(first.start, max(first.start, last.stop)))


def _runs(workers: list[int], cols: int, longest: int) -> Iterator[list[int]]:
    """Split ascending worker ids into runs of consecutive ids in one band, ``longest`` at most."""
    run: list[int] = []
    for j in workers:
        if run and (j != run[-1] + 1 or j // cols != run[0] // cols or len(run) == longest):
            yield run
            run = []
        run.append(j)
    if run:
        yield run


def _prefetched(read: Callable[[int], np.ndarray | None], n: int) -> Iterator[np.ndarray | None]:
    """``read(0) .. read(n-1)``, each next read running in a thread while the caller writes."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0) if n else None
        for i in range(n):
            assert pending is not None, "read i is submitted before step i"
            data = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < n else None
            yield data
