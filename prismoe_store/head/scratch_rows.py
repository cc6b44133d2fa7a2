"""A raw float32 matrix in a scratch file, written once and read back by row blocks or row index.

Building a head reads its matrix many times: once to write the bands, and about fifteen times to
order the vocabulary (:func:`~prismoe_store.head.vocab_order.cluster_order`). The source may be
quantized (a GGUF's Q8_0 blocks) and the ordering maps every row by a ``[d, d]`` metric, so both
are done once, into a :class:`ScratchRows` file, and every later pass is a plain file read. Reads
go through ``readinto``/``pread`` (no memory map), so the file's pages stay in the page cache and
out of the process's resident memory: memory holds one block, whatever the matrix's size.

>>> import tempfile, os
>>> m = np.arange(10, dtype=np.float32).reshape(5, 2)
>>> s = ScratchRows(os.path.join(tempfile.mkdtemp(), "rows.f32"), 5, 2)
>>> s.fill_blocks((start, m[start:start + 2]) for start in (0, 2))
Traceback (most recent call last):
...
ValueError: the blocks filled 4 of 5 rows
>>> s.fill_blocks((start, m[start:start + 2]) for start in (0, 2, 4))
>>> s.read(1, 3).tolist(), s.gather(np.array([4, 0])).tolist()
([[2.0, 3.0], [4.0, 5.0]], [[8.0, 9.0], [0.0, 1.0]])
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from prismoe_store.errors import DataError

BLOCK_BYTES = 16 << 20  # rows copied per block by :meth:`ScratchRows.fill`


class ScratchRows:
    """A float32 ``[rows, d]`` matrix in the file ``path`` (see the module docstring)."""

    def __init__(self, path: str, rows: int, d: int):
        self.path, self.rows, self.d = path, rows, d  # file, [rows, d]
        self.row_bytes = 4 * d  # bytes of one row

    def fill(self, matrix, progress=None) -> None:
        """Copy ``matrix`` (sliced like a NumPy array, ``[rows, d]``) block by block, refusing NaN/Inf
        (:class:`DataError` naming the row); ``progress(done, total)`` after each block."""
        step = max(1, BLOCK_BYTES // self.row_bytes)

        def blocks():
            for start in range(0, self.rows, step):
                block = np.ascontiguousarray(matrix[start:min(self.rows, start + step), :], dtype=np.float32)
                if not np.isfinite(block).all():
                    bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                    raise DataError(f"row {bad} of the matrix holds NaN or Inf: a head cannot be built from it")
                yield start, block
                if progress:
                    progress(min(self.rows, start + step), self.rows)

        self.fill_blocks(blocks())

    def fill_blocks(self, blocks: Iterable[tuple[int, np.ndarray]]) -> None:
        """Write consecutive row blocks ``(start, float32 [n, d])`` from row 0; raises ``ValueError``
        when they are out of order or do not cover every row."""
        done = 0
        with open(self.path, "wb") as f:
            for start, block in blocks:
                if start != done or block.shape[1:] != (self.d,):
                    raise ValueError(f"a block of shape {block.shape} at row {start} after {done} rows")
                f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
                done += len(block)
        if done != self.rows:
            raise ValueError(f"the blocks filled {done} of {self.rows} rows")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 ``[stop - start, d]``."""
        out = np.empty((stop - start, self.d), np.float32)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(start * self.row_bytes)
            f.readinto(out.data.cast("B"))
        return out

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order) as float32 ``[len(index), d]``, one ``pread`` per row."""
        out = np.empty((len(index), self.d), np.float32)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(index.tolist()):
                out[i] = np.frombuffer(os.pread(fd, self.row_bytes, r * self.row_bytes), np.float32)
        finally:
            os.close(fd)
        return out
