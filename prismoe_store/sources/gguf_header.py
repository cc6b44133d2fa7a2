"""A GGUF header reader that keeps memory flat: metadata scalars and short arrays, tensor layout.

``gguf.GGUFReader`` builds NumPy views for every metadata item, so a file whose vocabulary holds
262 144 tokens (``tokenizer.ggml.tokens``, ``scores``, ``token_type``, ``merges``) costs hundreds
of MB of RSS just to open — more than the head it is read for. This reader streams the header
once through a buffered file: it keeps scalars, strings and arrays of at most
:data:`KEEP_ARRAY` items, records longer arrays only as :class:`ArraySummary`, and computes each
tensor's absolute byte range. The format: magic ``GGUF``, version (2 or 3), tensor and metadata
counts, the key/value pairs, the tensor infos (name, dims innermost first, type, offset), then
data aligned to ``general.alignment`` (32 by default).

>>> import tempfile, os, numpy as np, gguf
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "t.gguf")
>>> w = gguf.GGUFWriter(p, arch="llama"); w.add_tensor("w", np.zeros((3, 32), np.float32))
>>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
>>> h = read_gguf_header(p)
>>> h.metadata["general.architecture"], h.tensors[0].shape, h.tensors[0].type_name
('llama', (3, 32), 'F32')
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from prismoe_store.errors import SourceError

KEEP_ARRAY = 64  # metadata arrays up to this many items are kept; longer ones are summarised
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array, not kept: its item type code and length."""

    item_type: int  # GGUF value type code of the items
    count: int  # number of items


@dataclass(frozen=True)
class GGUFTensorEntry:
    """Where one tensor's bytes are."""

    name: str  # the tensor's name
    shape: tuple[int, ...]  # numpy order, rows first (GGUF lists dims innermost first)
    type_name: str  # GGMLQuantizationType name ("F32", "Q8_0", ...) or "type<N>" when unknown
    offset: int  # absolute byte offset of its data in ``file``
    n_bytes: int  # bytes of its data (0 when the type is unknown)
    file: str  # the file holding it


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header: version, metadata (long arrays summarised) and tensor layout."""

    path: str  # the file
    version: int  # GGUF version (2 or 3)
    metadata: Mapping[str, Any]  # key -> scalar, string, short list, or ArraySummary
    tensors: tuple[GGUFTensorEntry, ...]  # in file order


class _Reader:
    """Little-endian reads of GGUF values from a buffered file, lengths checked against its size."""

    def __init__(self, f: BinaryIO, path: str, size: int, endian: str):
        self.f, self.path, self.size, self.e = f, path, size, endian

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise SourceError(f"cannot read {self.path} as GGUF: the header is cut short (truncated?)")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(self.e + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        self._check(n)
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("Q")
        self._check(n)
        self.f.seek(n, os.SEEK_CUR)

    def _check(self, n: int) -> None:
        if n > self.size - self.f.tell():
            raise SourceError(f"cannot read {self.path} as GGUF: a length of {n} runs past the end (truncated?)")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if count <= KEEP_ARRAY:
                return [self.value(item) for _ in range(count)]
            self._skip_array(item, count)
            return ArraySummary(item, count)
        raise SourceError(f"cannot read {self.path} as GGUF: unknown metadata value type {kind} (corrupt?)")

    def _skip_array(self, item: int, count: int) -> None:
        if item in _SCALARS:
            n = count * struct.calcsize(_SCALARS[item])
            self._check(n)
            self.f.seek(n, os.SEEK_CUR)
        elif item == _STRING:
            self._check(count * 8)
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(item)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's header (memory flat in the metadata size); a SourceError if it is not one."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb", buffering=2**20) as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"cannot read {path} as GGUF: no GGUF magic")
        raw = f.read(4)
        version = struct.unpack("<I", raw)[0] if len(raw) == 4 else 0
        if len(raw) == 4 and struct.unpack(">I", raw)[0] in (2, 3):
            raise SourceError(f"{path} is a big-endian GGUF, which this tool does not read: "
                              "convert it with gguf-convert-endian")
        r = _Reader(f, path, size, "<")
        if version not in (2, 3):
            raise SourceError(f"cannot read {path} as GGUF: version {version} is not supported (2 or 3)")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        if n_tensors > size or n_kv > size:
            raise SourceError(f"cannot read {path} as GGUF: implausible counts (corrupt?)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("I")
            if n_dims > 8:
                raise SourceError(f"cannot read {path} as GGUF: tensor {name!r} has {n_dims} dims (corrupt?)")
            dims = [r.unpack("Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, r.unpack("I"), r.unpack("Q")))
        align = metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1:
            raise SourceError(f"cannot read {path} as GGUF: bad general.alignment {align!r}")
        data_start = -(-f.tell() // align) * align
    entries = []
    for name, dims, type_id, offset in raw_infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            entries.append(GGUFTensorEntry(name, tuple(reversed(dims)), f"type{type_id}", data_start + offset, 0, path))
            continue
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % block:
            raise SourceError(f"cannot read {path} as GGUF: tensor {name!r} rows of {dims[0]} are not whole "
                              f"{qtype.name} blocks of {block}")
        entries.append(GGUFTensorEntry(name, tuple(int(d) for d in reversed(dims)), qtype.name,
                                       data_start + offset, n // block * type_size, path))
    return GGUFHeader(path, version, metadata, tuple(entries))
