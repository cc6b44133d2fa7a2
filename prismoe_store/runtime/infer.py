"""Run a runtime over input rows into a ``.npy`` file (``prismoe infer``), and its statistics as text.

:func:`infer_rows` streams the rows through the runtime batch by batch into a float32 ``.npy``
``[rows, d_out]`` written beside ``output`` and renamed onto it only once every row is written
(an interrupted run leaves no partial file behind); memory stays one batch. :func:`cache_line`
and :func:`infer_line` are the one-line summaries the CLI prints.

>>> import os, tempfile, numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.runtime.open import open_runtime
>>> from prismoe_store.stores.adapter import AdapterStore
>>> a = AdapterStore.create("memory://doc-infer", grids=[plan_grid(4, 4, 4)], overwrite=True,
...                         attrs={"complete": True})
>>> out = os.path.join(tempfile.mkdtemp(), "y.npy")
>>> stats = infer_rows(open_runtime(a), lambda s, e: np.ones((e - s, 4), np.float32), 5, out, batch_size=2)
>>> np.load(out).shape, stats["rows"]
((5, 4), 5)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from prismoe_store.errors import DataError

Progress = Callable[[int, int], None]


def infer_rows(runtime, read: Callable[[int, int], np.ndarray], rows: int, output, *, batch_size: int = 256,
               progress: Progress | None = None) -> dict:
    """Write ``runtime(read(s, e))`` for every batch of ``rows`` input rows to ``output`` (``.npy``,
    float32 ``[rows, d_out]``); closes the runtime. Returns its :meth:`stats` plus ``rows``,
    ``d_out``, ``output`` and ``rows_per_second``. Raises :class:`DataError` when the folder of
    ``output`` does not exist or ``batch_size`` is not positive."""
    check_output_folder(output)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    part = f"{output}.{os.getpid()}.part"  # renamed onto the output only once every row is written
    t0 = time.perf_counter()
    try:
        y = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32, shape=(rows, runtime.d_out))
        with runtime:
            if progress:  # the bar starts before the first batch (which loads the tiles), as the timing does
                progress(0, rows)
            for start in range(0, rows, batch_size):
                stop = min(rows, start + batch_size)
                y[start:stop] = runtime(read(start, stop)).cpu().numpy()
                if progress:
                    progress(stop, rows)
            stats = runtime.stats()
        y.flush()
        del y
        os.replace(part, output)
    finally:
        if os.path.exists(part):
            os.remove(part)
    stats.update(rows=rows, d_out=runtime.d_out, output=str(output), wall_seconds=time.perf_counter() - t0,
                 rows_per_second=rows / stats["seconds"] if stats["seconds"] else None)
    return stats


def check_output_folder(output) -> None:
    """Raise :class:`DataError` when the folder ``output`` would be written in does not exist
    (checked before any work, so that a run does not end in a failed write)."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise DataError(f"the folder {folder} does not exist: create it before writing the output there")


def infer_line(stats: dict) -> str:
    """What :func:`infer_rows` did, in one line."""
    wall = (f"; {stats['wall_seconds']:.1f} s with reading the rows and writing the output"
            if "wall_seconds" in stats else "")
    return (f"wrote {stats['output']}: {stats['rows']} × {stats['d_out']} float32 in {stats['seconds']:.3f} s of "
            f"runtime calls, loading the tiles included{wall} ({stats['rows_per_second'] or 0:.0f} rows/s; "
            f"{stats['quant']}, {stats.get('schedule', 'select')}, "
            f"ρ = {_number(stats['sparsity'])}, {stats['device']})")


def _number(value) -> str:
    """``1.0`` as ``1``, ``0.25`` as ``0.25`` (as the other commands print ρ); anything else as it is.

    >>> _number(1.0), _number(0.25), _number(None)
    ('1', '0.25', 'None')
    """
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def cache_line(stats: dict) -> str:
    """A runtime's device-cache counters (its ``stats()``), in one line."""
    c = stats["cache"]
    return (f"cache: hit rate {c['hit_rate']:.3f} ({c['hits']} hits, {c['misses']} misses, "
            f"{c['evictions']} evictions), {c['bytes_loaded'] / 2**20:.2f} MiB loaded, "
            f"peak {c['peak_bytes'] / 2**20:.2f} of {c['budget_bytes'] / 2**20:.2f} MiB budget")
