"""Extract 2-D tensors from real checkpoints into a weights store, streaming block by block.

A *source* is an opened checkpoint: it lists its tensors (:class:`TensorInfo`) and reads any
rectangular region of a 2-D tensor as float32 (float64 for float64 tensors). Backends:
a single ``.safetensors`` file, a sharded Hugging Face folder (``model.safetensors.index.json``
or ``pytorch_model.bin.index.json``), a PyTorch ``.pt``/``.bin``/``.pth`` state dict, a ``.gguf``
file (quantized tensors dequantized with ``gguf.quants``) and a ``.npy`` matrix.

Every read maps only the bytes it needs and unmaps them before it returns, so pages touched in
the source never pile up in the process's resident memory: extraction holds at most about two
blocks of ``block_bytes`` (default 16 MiB) whatever the size of the matrix.

The names ``lm_head`` and ``embedding`` are aliases for the usual tensor names of Llama, Qwen,
GPT-2, BERT and GGUF checkpoints; ``lm_head`` falls back to the embedding when the checkpoint
ties them (has no head of its own).

>>> import tempfile, numpy as np
>>> from prismoe_store.extract import extract
>>> with tempfile.TemporaryDirectory() as d:
...     w = np.arange(96, dtype=np.float32).reshape(12, 8)
...     np.save(f"{d}/head.npy", w)
...     store = extract(f"{d}/head.npy", "memory://doc-extract", workers=4, overwrite=True)
...     bool((store.read("lm_head") == w).all())
True
"""

from __future__ import annotations

import json
import os
import zipfile
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import SourceError, StoreError, TensorNotFoundError
from .grid import DEFAULT_WORKERS, GridSpec, plan_grid
from .stores import StoreOptions, TensorWriter, WeightsStore

Dtype = Literal["float32", "float16", "source"]
ProgressFn = Callable[[int, int], None]
BLOCK_BYTES = 16 * 2**20  # default size of one block of tiles (stored bytes); ~2 are in memory at once
PIECE_BYTES = 4 * 2**20  # source rows one backend call maps at most; unmapped before the next call

# Names tried, in order, for each alias; then a unique name ending in one of the suffixes.
ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head": (
        "lm_head.weight", "output.weight", "model.lm_head.weight", "language_model.lm_head.weight",
        "embed_out.weight", "cls.predictions.decoder.weight",
    ),
    "embedding": (
        "model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight", "wte.weight",
        "bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", "token_embd.weight",
        "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "model.decoder.embed_tokens.weight",
        "language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
        "tok_embeddings.weight", "shared.weight",
    ),
}
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "lm_head": ("lm_head.weight",),
    "embedding": ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "token_embd.weight"),
}
_TIED = {"lm_head": "embedding"}  # tied checkpoints have no head: use the embedding


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source, as the source describes it.

    >>> TensorInfo("lm_head.weight", (32000, 4096), "BF16").is_matrix
    True
    """

    name: str  # the tensor's name in the source
    shape: tuple[int, ...]  # numpy order, rows first (GGUF's reversed dims already flipped)
    dtype: str  # the source's own spelling: "F32", "BF16", "Q4_0", "float16", ...

    def __post_init__(self) -> None:
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise SourceError(f"tensor {self.name!r} has a bad shape {self.shape}")

    @property
    def is_matrix(self) -> bool:
        """True for a 2-D tensor."""
        return len(self.shape) == 2


# -- the source protocol ---------------------------------------------------------------------


class Source(ABC):
    """An opened checkpoint: list tensors, read regions of 2-D tensors as float arrays."""

    format: str = ""  # short format name recorded in the store ("safetensors", "gguf", ...)

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)  # the file (or index/folder) the source was opened from

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, by name."""

    @abstractmethod
    def _read(self, name: str, rows: slice, cols: slice):
        """Backend read of a region (bounds checked): a numpy array or torch tensor, possibly a view
        of a memory map that the caller copies and then drops (which unmaps it)."""

    def read(self, name: str, rows: slice, cols: slice | None = None) -> np.ndarray:
        """Region ``[rows, cols]`` of 2-D tensor ``name`` as a C-contiguous float32/float64 array."""
        info = self.matrix(name)
        rows, cols = _clip(rows, info.shape[0]), _clip(cols or slice(None), info.shape[1])
        wide = _store_dtype(info.dtype) == "float64"
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), np.float64 if wide else np.float32)
        step = max(1, PIECE_BYTES // (4 * info.shape[1]))  # whole source rows per backend call
        with _reading(self.path, self.format):
            for r in range(rows.start, rows.stop, step):
                piece = slice(r, min(r + step, rows.stop))
                _copy_into(out[r - rows.start:piece.stop - rows.start], self._read(info.name, piece, cols))
        return out

    def resolve(self, name: str) -> TensorInfo:
        """The tensor called ``name``, or the one an alias (``lm_head``, ``embedding``) stands for."""
        found = resolve_name(self.tensors(), name)
        if found is None:
            raise TensorNotFoundError(f"no tensor {name!r} in {self.path}; it has {_listing(self.tensors())}")
        return self.tensors()[found]

    def matrix(self, name: str) -> TensorInfo:
        """Like :meth:`resolve`, and check that the tensor is a 2-D floating-point matrix."""
        info = self.resolve(name)
        if not info.is_matrix:
            raise SourceError(
                f"tensor {info.name!r} in {self.path} has shape {info.shape}: only 2-D matrices can be tiled")
        if _store_dtype(info.dtype) is None:
            raise SourceError(f"tensor {info.name!r} in {self.path} has dtype {info.dtype}, not a floating-point type")
        return info


def resolve_name(names: Iterable[str], wanted: str) -> str | None:
    """The source name ``wanted`` refers to (itself, an alias target, or the tied embedding).

    >>> resolve_name(["model.embed_tokens.weight", "model.norm.weight"], "lm_head")
    'model.embed_tokens.weight'
    """
    names = list(names)
    if wanted in names:
        return wanted
    if wanted not in ALIASES:
        return None
    if len(names) == 1:  # a lone matrix (.npy, a bare tensor) answers to every alias
        return names[0]
    for candidate in ALIASES[wanted]:
        if candidate in names:
            return candidate
    hits = [n for n in names if n.endswith(_SUFFIXES[wanted])]
    if len(hits) == 1:
        return hits[0]
    return resolve_name(names, _TIED[wanted]) if wanted in _TIED else None


def _listing(infos: Mapping[str, TensorInfo], limit: int = 30) -> str:
    names = sorted(infos, key=lambda n: (not infos[n].is_matrix, n))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensors: " + ", ".join(names[:limit]) + more


def _clip(s: slice, n: int) -> slice:
    start, stop, step = s.indices(n)
    if step != 1 or stop < start:
        raise SourceError(f"cannot read region {s} of a dimension of {n}")
    return slice(start, stop)


def _copy_into(out: np.ndarray, block) -> None:
    """Copy a numpy or torch block (any float dtype) into ``out``, converting on the way."""
    if isinstance(block, np.ndarray):
        out[...] = block
    else:  # a torch tensor (bf16, fp8, torch checkpoints)
        import torch

        torch.from_numpy(out).copy_(block)


@contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Turn whatever a format library raises on a damaged file into a one-line SourceError."""
    try:
        yield
    except (SourceError, MemoryError):
        raise
    except FileNotFoundError:
        raise SourceError(f"no such file: {path}") from None
    except Exception as e:  # noqa: BLE001 - format libraries raise anything on corrupt input
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise SourceError(f"cannot read {path} as {what} (truncated or corrupt?): {msg}") from None


# -- dtypes ----------------------------------------------------------------------------------

_FLOAT_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "float32", "F8_E4M3": "float32",
    "F8_E5M2": "float32", "float64": "float64", "float32": "float32", "float16": "float16",
    "bfloat16": "float32", "float8_e4m3fn": "float32", "float8_e5m2": "float32",
}


def _store_dtype(source_dtype: str) -> str | None:
    """The dtype ``--dtype source`` stores a source dtype as (None: not floating point).

    Floating types numpy lacks (bf16, fp8) and GGUF quant types are stored as float32, exactly.
    """
    if source_dtype in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[source_dtype]
    return "float32" if _gguf_supported(source_dtype) else None


# -- backends --------------------------------------------------------------------------------


class SafetensorsSource(Source):
    """A ``.safetensors`` file, read with ``safe_open(...).get_slice`` (memory-mapped).

    Each read opens its own map and drops it before returning, so touched pages leave RSS.
    """

    format = "safetensors"

    def __init__(self, path):
        super().__init__(path)
        from safetensors import safe_open

        with _reading(self.path, "safetensors"):
            f = safe_open(self.path, framework="numpy")
            self._infos = {k: _st_info(k, f.get_slice(k)) for k in f.keys()}

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def _read(self, name, rows, cols):
        from safetensors import safe_open

        numpy_ok = self._infos[name].dtype in ("F16", "F32", "F64")
        f = safe_open(self.path, framework="numpy" if numpy_ok else "pt")  # bf16/fp8 need torch
        return f.get_slice(name)[rows, cols]


def _st_info(name: str, sl) -> TensorInfo:
    return TensorInfo(name, tuple(int(d) for d in sl.get_shape()), sl.get_dtype())


class TorchSource(Source):
    """A PyTorch ``.pt``/``.bin``/``.pth`` file: a state dict (nested dicts flattened) or one tensor.

    Loaded with ``torch.load(weights_only=True, mmap=True)`` afresh for each read (cheap: only
    the pickle is parsed). Files in the legacy, non-zip format cannot be mapped; they are loaded
    whole once.
    """

    format = "torch"

    def __init__(self, path):
        super().__init__(path)
        self._mmap = zipfile.is_zipfile(self.path)
        state = self._load()
        self._cached = None if self._mmap else state
        self._infos = {k: TensorInfo(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in state.items()}

    def _load(self) -> dict:
        import torch

        if not os.path.isfile(self.path):
            raise SourceError(f"no such file: {self.path}")
        with _reading(self.path, "a PyTorch checkpoint"):
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self._mmap)
        return _flatten(obj, Path(self.path).stem)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def _read(self, name, rows, cols):
        state = self._cached if self._cached is not None else self._load()
        return state[name][rows, cols]


def _flatten(obj, stem: str, prefix: str = "") -> dict:
    """``{dotted.name: tensor}`` from a tensor, a state dict, or dicts of state dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip(".") or stem: obj}
    out: dict = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (torch.Tensor, Mapping)):
                out.update(_flatten(v, stem, f"{prefix}{k}."))
    return out


class GGUFSource(Source):
    """A ``.gguf`` file; quantized tensors are dequantized with ``gguf.quants.dequantize``.

    The header is parsed once with ``gguf.GGUFReader``; each read then maps just the rows it
    needs (whole quant blocks of 32 or 256 values along a row) and dequantizes them.
    """

    format = "gguf"

    def __init__(self, path):
        super().__init__(path)
        import gguf

        with _reading(self.path, "GGUF"):
            reader = gguf.GGUFReader(self.path)
            self._layout = {t.name: (t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
            self._infos = {
                t.name: TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
                for t in reader.tensors
            }
        size = os.path.getsize(self.path)
        for name, (_, offset, n_bytes) in self._layout.items():
            if offset + n_bytes > size:
                raise SourceError(f"cannot read {self.path} as GGUF: tensor {name!r} runs past the end (truncated?)")

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def matrix(self, name: str) -> TensorInfo:
        info = super().resolve(name)
        if info.is_matrix and info.dtype not in _FLOAT_DTYPES and not _gguf_supported(info.dtype):
            raise SourceError(
                f"GGUF tensor {info.name!r} has type {info.dtype}, which cannot be dequantized "
                f"(supported: {', '.join(_gguf_supported_types())})"
            )
        return super().matrix(name)

    def _read(self, name, rows, cols):
        from gguf import GGML_QUANT_SIZES

        qtype, offset, _ = self._layout[name]
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = self._infos[name].shape[1] // block * type_size
        b0, b1 = cols.start // block, -(-cols.stop // block)
        mm = np.memmap(self.path, np.uint8, "r", offset=offset + rows.start * row_bytes,
                       shape=(rows.stop - rows.start, row_bytes))
        values = _dequantize(mm[:, b0 * type_size:b1 * type_size], qtype.name)  # may be a view of the map
        return values[:, cols.start - b0 * block:cols.stop - b0 * block]


def _dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if type_name == "F64":  # gguf.quants has no F64 path
        return raw.view(np.float64)
    return dequantize(raw, GGMLQuantizationType[type_name])


def _gguf_supported(type_name: str) -> bool:
    return type_name in _gguf_supported_types()


_SUPPORTED: list[str] = []


def _gguf_supported_types() -> list[str]:
    """GGUF types this backend can turn into floats (probed once on one zero block)."""
    if not _SUPPORTED:
        from gguf import GGML_QUANT_SIZES

        for qtype, (_, type_size) in GGML_QUANT_SIZES.items():
            if qtype.name in ("I8", "I16", "I32", "I64"):
                continue  # integer tensors are not weights to tile
            try:
                _dequantize(np.zeros((1, type_size), np.uint8), qtype.name)
                _SUPPORTED.append(qtype.name)
            except (NotImplementedError, ValueError, KeyError):
                pass
    return _SUPPORTED


class NpySource(Source):
    """A ``.npy`` file holding one matrix, memory-mapped afresh for each read; named by the file stem."""

    format = "npy"

    def __init__(self, path):
        super().__init__(path)
        with _reading(self.path, ".npy"):
            arr = np.load(self.path, mmap_mode="r")
            name = Path(self.path).stem
            self._infos = {name: TensorInfo(name, tuple(int(d) for d in arr.shape), arr.dtype.name)}
            del arr

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def _read(self, name, rows, cols):
        return np.load(self.path, mmap_mode="r")[rows, cols]  # a view: unmapped once the caller drops it


class ShardedSource(Source):
    """A Hugging Face sharded checkpoint: an ``*.index.json`` whose ``weight_map`` names the shards."""

    format = "sharded"

    def __init__(self, index_path):
        super().__init__(index_path)
        with _reading(self.path, "a checkpoint index"):
            weight_map = json.loads(Path(self.path).read_text())["weight_map"]
        folder = Path(self.path).parent
        self._shards = {f: open_source(folder / f) for f in sorted(set(weight_map.values()))}
        self.format = "sharded " + "/".join(sorted({s.format for s in self._shards.values()}))
        self._where = dict(weight_map)
        self._infos = {}
        for name, file in weight_map.items():
            shard_infos = self._shards[file].tensors()
            if name not in shard_infos:
                raise SourceError(f"{self.path} puts {name!r} in {file}, which has no such tensor")
            self._infos[name] = shard_infos[name]

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def _read(self, name, rows, cols):
        return self._shards[self._where[name]]._read(name, rows, cols)


_BACKENDS: dict[str, type[Source]] = {
    ".safetensors": SafetensorsSource, ".gguf": GGUFSource, ".npy": NpySource,
    ".pt": TorchSource, ".pth": TorchSource, ".bin": TorchSource, ".ckpt": TorchSource,
}
_MAGIC: list[tuple[bytes, type[Source]]] = [  # torch: a zip file, or a legacy pickle
    (b"GGUF", GGUFSource), (b"\x93NUMPY", NpySource), (b"PK\x03\x04", TorchSource), (b"\x80", TorchSource),
]
_FOLDER_FILES = (  # what a model folder is read from, first found wins
    "model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin",
)


def open_source(path: str | os.PathLike) -> Source:
    """Open a checkpoint file or folder, choosing the backend by name (or by magic bytes).

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     np.save(f"{d}/w.npy", np.zeros((4, 3), np.float16))
    ...     open_source(f"{d}/w.npy").tensors()["w"]
    TensorInfo(name='w', shape=(4, 3), dtype='float16')
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"no such file or folder: {p}")
    if p.is_dir():
        return _open_folder(p)
    if p.name.endswith(".index.json"):
        return ShardedSource(p)
    backend = _BACKENDS.get(p.suffix.lower()) or _sniff(p)
    return backend(p)


def _open_folder(folder: Path) -> Source:
    for name in _FOLDER_FILES:
        if (folder / name).is_file():
            return open_source(folder / name)
    weights = [f for f in sorted(folder.iterdir()) if f.suffix.lower() in _BACKENDS]
    if len(weights) == 1:
        return open_source(weights[0])
    found = ", ".join(f.name for f in weights) or "no weight files"
    raise SourceError(f"cannot tell which checkpoint to read in {folder} (found {found}): name a file")


def _sniff(p: Path) -> type[Source]:
    with open(p, "rb") as f:
        head = f.read(9)
    for magic, backend in _MAGIC:
        if head.startswith(magic):
            return backend
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return SafetensorsSource
    raise SourceError(f"{p} is not a checkpoint format this tool reads (.safetensors, .pt/.bin, .gguf, .npy)")


# -- extraction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    name: str  # the tensor's name in the store
    info: TensorInfo  # the source tensor it is copied from
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
) -> WeightsStore:
    """Copy 2-D tensors of a checkpoint into a weights store, one tile per chunk, streaming.

    ``tensors`` are source names or aliases (``lm_head``, ``embedding``), each stored under the
    name asked for; a mapping ``{store_name: source_name}`` renames. Every name is resolved before
    the store is touched. Re-running into an existing store resumes: finished tiles are kept as
    they are and only the missing ones are written. ``dtype="source"`` keeps float16/float64 and
    stores other source types (bf16, fp8, GGUF quants) as float32.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     np.save(f"{d}/emb.npy", np.ones((8, 4), np.float32))
    ...     store = extract(f"{d}/emb.npy", "memory://doc-extract-2", tensors={"E": "embedding"},
    ...                     workers=2, overwrite=True)
    ...     store.grid("E").workers, store.read("E").shape
    (2, (8, 4))
    """
    src = source if isinstance(source, Source) else open_source(source)
    tensors = [tensors] if isinstance(tensors, str) else tensors
    wanted = dict(tensors) if isinstance(tensors, Mapping) else {t: t for t in tensors}
    if not wanted:
        raise SourceError("no tensor to extract was named")
    jobs = [_plan(src, name, source_name, workers, dtype) for name, source_name in wanted.items()]
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
    job = _plan(src, name or Path(str(matrix)).stem, matrices[0], workers, dtype)
    return _run(src, [job], store_url, options=options, overwrite=overwrite, progress=progress,
                block_bytes=block_bytes)


def _plan(src: Source, name: str, source_name: str, workers: int, dtype: Dtype) -> _Job:
    if dtype not in ("float32", "float16", "source"):
        raise StoreError(f"dtype must be float32, float16 or source, got {dtype!r}")
    info = src.matrix(source_name)
    rows, cols = info.shape
    if rows == 0 or cols == 0:
        raise SourceError(f"tensor {info.name!r} in {src.path} is empty (shape {info.shape})")
    stored = _store_dtype(info.dtype) if dtype == "source" else dtype
    return _Job(name, info, plan_grid(cols, rows, workers), stored)


def _run(src: Source, jobs: list[_Job], store_url, *, options, overwrite, progress, block_bytes) -> WeightsStore:
    if not isinstance(block_bytes, int) or block_bytes < 1:
        raise StoreError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    store = WeightsStore.create(store_url, options=options, overwrite=overwrite)
    writers = [_begin(store, src, job) for job in jobs]
    total = sum(w.progress.units for w in writers)
    done = total - sum(len(w.missing()) for w in writers)
    tick = _ticker(progress, done, total)
    for job, writer in zip(jobs, writers):
        _copy(src, job, writer, block_bytes, tick)
        writer.finish()
    return store


def _begin(store: WeightsStore, src: Source, job: _Job) -> TensorWriter:
    """Start or resume a tensor; resuming from another source tensor is refused."""
    attrs = {"source": src.path, "source_format": src.format, "source_tensor": job.info.name,
             "source_dtype": job.info.dtype, "source_shape": list(job.info.shape)}
    if job.name in store.tensors(include_incomplete=True):
        old = store.info(job.name)
        for key in ("source_tensor", "source_dtype", "source_shape"):
            if old.get(key) != attrs[key]:
                raise StoreError(f"{job.name!r} in {store.url} came from {key}={old.get(key)}, not {attrs[key]}: "
                                 "use another store or --overwrite")
    return store.begin(job.name, job.grid, dtype=job.dtype, source=attrs)


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
        return None if b.empty else src.read(job.info.name, b.rows, b.cols).astype(job.dtype, copy=False)

    for block, data in zip(blocks, _prefetched(read, len(blocks))):
        _write(writer, block, data)
        tick(1 if writer.sharded else len(block.workers))


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
            data = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < n else None
            yield data
