"""GGUF files — one file or a split set — as a :class:`~prismoe_store.sources.base.Source`.

The header is read with :func:`~prismoe_store.sources.gguf_header.read_gguf_header` (memory flat in the
size of the vocabulary metadata). Each read maps only the rows it needs (a GGUF row is a whole
number of quant blocks of 32 or 256 values), dequantizes that slice with
``gguf.quants.dequantize`` and drops the map, so peak memory does not grow with the matrix.

**Split sets.** ``llama-gguf-split`` writes ``NAME-00001-of-0000N.gguf`` .. with ``split.count``
and ``split.no`` in each file's metadata; tensors are spread over the parts (``output.weight``
is often in the last one). Opening any part (or a folder holding just one set) reads all parts
as one checkpoint; a missing part is refused, never skipped.

**Tied heads.** llama.cpp uses ``token_embd.weight`` as the output matrix when a model has no
``output.weight``: a complete set without it *shows* that the head is tied.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from prismoe_store.errors import SourceError
from prismoe_store.sources.base import FLOAT_DTYPES, Source
from prismoe_store.sources.gguf_header import GGUFHeader, GGUFTensorEntry, read_gguf_header
from prismoe_store.sources.records import CheckpointFacts, TensorInfo

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SKIP_TYPES = ("I8", "I16", "I32", "I64")  # integer tensors are not weights to tile


class GGUFSource(Source):
    """A ``.gguf`` file, or every part of the split set it belongs to."""

    format = "gguf"

    def __init__(self, path, facts: CheckpointFacts | None = None):
        super().__init__(path)
        headers = split_set(Path(self.path))
        self._parts = [h.path for h in headers]
        self._entries: dict[str, GGUFTensorEntry] = {}
        for h in headers:
            for e in h.tensors:
                if e.name in self._entries:
                    raise SourceError(f"tensor {e.name!r} is in two parts of {self.path}'s split set")
                if e.n_bytes and e.offset + e.n_bytes > Path(e.file).stat().st_size:
                    raise SourceError(f"cannot read {e.file} as GGUF: tensor {e.name!r} runs past the end (truncated?)")
                self._entries[e.name] = e
        expected = headers[0].metadata.get("split.tensors.count")
        if len(headers) > 1 and isinstance(expected, int) and expected != len(self._entries):
            raise SourceError(f"{self.path}'s split set declares {expected} tensors but its "
                              f"{len(headers)} parts hold {len(self._entries)}")
        self._infos = {n: TensorInfo(n, e.shape, e.type_name) for n, e in self._entries.items()}
        self.metadata = dict(headers[0].metadata)  # the first part's metadata (scalars, short arrays)
        self.facts = facts or self._facts(len(headers))

    def _facts(self, parts: int) -> CheckpointFacts:
        where = f"a {parts}-part split GGUF" if parts > 1 else "a GGUF file"
        if "output.weight" in self._entries:
            return CheckpointFacts(tied=False, tied_why=f"{where} with output.weight")
        if "token_embd.weight" in self._entries:
            return CheckpointFacts(tied=True, tied_why=f"{where} without output.weight (llama.cpp then uses "
                                                       "token_embd.weight as the output)")
        return CheckpointFacts()

    @property
    def parts(self) -> list[str]:
        """The files read as this checkpoint (one, or every part of a split set in order)."""
        return list(self._parts)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def files(self) -> list[str]:
        return list(self._parts)

    def value_dtype(self, source_dtype: str) -> str | None:
        if source_dtype in FLOAT_DTYPES:
            return FLOAT_DTYPES[source_dtype]
        return "float32" if source_dtype in supported_types() else None

    def matrix(self, name: str) -> TensorInfo:
        info = self.resolve(name)
        if info.is_matrix and self.value_dtype(info.dtype) is None and info.dtype not in _SKIP_TYPES:
            raise SourceError(
                f"GGUF tensor {info.name!r} has type {info.dtype}, which cannot be dequantized "
                f"(supported: {', '.join(supported_types())})")
        return super().matrix(name)

    def read_stored(self, name, rows, cols):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        e = self._entries[name]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[e.type_name]]
        row_bytes = e.shape[1] // block * type_size
        b0, b1 = cols.start // block, -(-cols.stop // block)
        mm = np.memmap(e.file, np.uint8, "r", offset=e.offset + rows.start * row_bytes,
                       shape=(rows.stop - rows.start, row_bytes))
        values = dequantize(mm[:, b0 * type_size:b1 * type_size], e.type_name)  # may be a view of the map
        return values[:, cols.start - b0 * block:cols.stop - b0 * block]

    def read_stored_all(self, name):
        e = self._entries[name]
        mm = np.memmap(e.file, np.uint8, "r", offset=e.offset, shape=(e.n_bytes,))
        return np.array(dequantize(mm, e.type_name)).reshape(e.shape)


def split_set(path: Path) -> list[GGUFHeader]:
    """The headers of every part of the split set ``path`` belongs to (just ``path``'s when not split)."""
    first = read_gguf_header(path)
    count = first.metadata.get("split.count", 1)
    if not isinstance(count, int) or count < 1:
        raise SourceError(f"{path} has a bad split.count {count!r}")
    if count == 1:
        return [first]
    m = SPLIT_NAME.match(path.name)
    if m is None or int(m["count"]) != count:
        raise SourceError(f"{path} is part {first.metadata.get('split.no', 0) + 1} of a {count}-part split GGUF, "
                          f"but its name does not follow NAME-0000k-of-{count:05d}.gguf: cannot find the other parts")
    names = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in names if not p.is_file()]
    if missing:
        raise SourceError(f"{path} is part of a {count}-part split GGUF, but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} missing beside it: every part is needed")
    headers = [first if p == path else read_gguf_header(p) for p in names]
    for i, h in enumerate(headers):
        if h.metadata.get("split.no", i) != i or h.metadata.get("split.count", count) != count:
            raise SourceError(f"{h.path} says it is part {h.metadata.get('split.no', '?')} of "
                              f"{h.metadata.get('split.count', '?')}, not part {i} of {count}")
    return headers


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """``gguf.quants.dequantize`` of raw bytes (rows of whole blocks); F64 too."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if type_name == "F64":  # gguf.quants has no F64 path
        return raw.view(np.float64)
    return gguf_dequantize(raw, GGMLQuantizationType[type_name])


_SUPPORTED: list[str] = []


def supported_types() -> list[str]:
    """GGUF types this backend can turn into floats (probed once on one zero block)."""
    if not _SUPPORTED:
        from gguf import GGML_QUANT_SIZES

        for qtype, (_, type_size) in GGML_QUANT_SIZES.items():
            if qtype.name in _SKIP_TYPES:
                continue
            try:
                dequantize(np.zeros((1, type_size), np.uint8), qtype.name)
                _SUPPORTED.append(qtype.name)
            except (NotImplementedError, ValueError, KeyError):
                pass
    return _SUPPORTED
