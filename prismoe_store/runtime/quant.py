"""INT8 tiles: symmetric per-output-row absmax quantization.

Each row ``i`` of a tile gets one scale ``s_i = max_j |T_ij| / 127`` (rounded up to float32) and its values become
``q_ij = round(T_ij / s_i)`` in ``[-127, 127]``; the runtime keeps ``q`` (1 byte a value) and
``s`` in its cache and rebuilds ``T ≈ q · s`` on the device at use. The error per element is at
most ``s_i / 2``. A row of zeros gets scale 0 and stays exactly zero.

>>> import numpy as np
>>> t = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]], np.float32)
>>> q, s = quantize_tile(t)
>>> q.tolist(), [round(float(v), 6) for v in s]
([[127, -63, 32], [0, 0, 0]], [0.007874, 0.0])
>>> bool(np.abs(dequantize_tile(q, s) - t).max() <= s.max() / 2)
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from prismoe_store.errors import DataError
from prismoe_store.stores.adapter import AdapterStore

QMAX = 127  # symmetric range [-127, 127]; -128 is never used, so negation is exact
SCHEME = "int8-absmax-per-row"  # what the adapter's ``int8`` attribute records


def quantize_tile(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a tile ``[rows, cols]`` to ``(q int8 [rows, cols], scales float32 [rows])``.

    >>> q, s = quantize_tile(np.array([[2.0, -1.0]], np.float32))
    >>> q.tolist(), bool(s[0] >= 2.0 / 127)
    ([[127, -63]], True)
    """
    tile = np.asarray(tile)
    if tile.ndim != 2:
        raise DataError(f"a tile must be 2-D, got shape {tile.shape}")
    if not np.isfinite(tile).all():
        raise DataError("cannot quantize a tile holding NaN or Inf")
    t = tile.astype(np.float64)  # [a, b]
    exact = np.abs(t).max(axis=1) / QMAX  # [a] float64
    scales = exact.astype(np.float32)  # [a], what is stored: rounded up so that |T / s| <= 127
    low = scales.astype(np.float64) < exact
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]  # [a, 1]
    q = np.clip(np.rint(t / safe), -QMAX, QMAX).astype(np.int8)  # [a, b]
    return q, scales


def dequantize_tile(q, scales):
    """``q · scales`` row by row: numpy in → float32 numpy out, torch in → float32 torch out (same device).

    >>> import torch
    >>> dequantize_tile(torch.tensor([[127, -127]], dtype=torch.int8), torch.tensor([0.5])).tolist()
    [[63.5, -63.5]]
    """
    if isinstance(q, torch.Tensor):
        return q.to(torch.float32, copy=True).mul_(scales.to(torch.float32)[:, None])  # [a, b], one temporary
    return np.asarray(q, np.float32) * np.asarray(scales, np.float32)[:, None]  # [a, b]


@dataclass(frozen=True)
class QuantReport:
    """What one :func:`quantize_adapter` call did (resumed runs report only the tiles they wrote)."""

    tiles: int  # tiles quantized by this call (padding-only tiles are recorded, not counted)
    skipped: int  # tiles already done by an earlier run (counted as ``tiles`` is: padding-only tiles left out)
    max_rel_error: float  # largest ‖T − q·s‖_F / ‖T‖_F over the tiles quantized here (0 when none)
    bytes_fp32: int  # bytes of the quantized tiles as float32
    bytes_int8: int  # bytes of the same tiles as INT8 plus their float32 scales


def quantize_adapter(adapter: AdapterStore, progress: Callable[[int, int], None] | None = None) -> QuantReport:
    """Write INT8 tiles and per-row scales for every pipe of ``adapter``, band by band, resumably.

    A band's tiles are quantized together and written in one Zarr call per array (their chunks
    are encoded concurrently); finished tiles are recorded in the store's progress records
    (``quantize_pipe{p}``, pipes counted from 0), so an interrupted run picks up where it
    stopped; the root attribute ``int8`` is written last. Padding-only tiles are never read by
    the runtime: they are recorded and not counted (they read back as zeros with scale 0).

    >>> import numpy as np
    >>> from prismoe_store.grid import plan_grid
    >>> g = plan_grid(6, 10, 8)
    >>> a = AdapterStore.create("memory://doc-quant", grids=[g], overwrite=True)
    >>> a.write_band(0, 0, np.ones((g.tile_out, g.d_in_pad), np.float32))
    >>> quantize_adapter(a).tiles, a.attrs()["int8"]["complete"]
    (6, True)
    """
    grids = adapter.grids
    records = [adapter.progress(f"quantize_pipe{p}", g.workers) for p, g in enumerate(grids)]
    for p, rec in enumerate(records):  # trust only finished tiles whose INT8 chunks still match their records
        rec.unmark(adapter.damaged_int8_tiles(p, [j for j in rec.done() if not grids[p].is_padding(j)]))
    missing = [set(rec.missing()) for rec in records]
    total = sum(g.active_count for g in grids)  # progress counts the tiles holding data, as the report does
    skipped = sum(g.active_count - sum(not g.is_padding(j) for j in m) for g, m in zip(grids, missing, strict=True))
    tiles, worst, bytes_fp32, bytes_int8 = 0, 0.0, 0, 0
    if progress:
        progress(skipped, total)
    for p, g in enumerate(grids):
        q_arr, s_arr = adapter.int8_arrays(p, create=True)
        live_rows, live_cols = g.live_shape  # tiles wholly in padding are not stored (as the fit's)
        for r in range(g.rows):
            band_workers = [j for j in range(r * g.cols, (r + 1) * g.cols) if j in missing[p]]
            if not band_workers:
                continue
            band = adapter.read_band(p, r)  # [a, C·b] float32 (fewer rows for a band grid's edge band)
            a = band.shape[0]
            rows = slice(r * g.tile_out, r * g.tile_out + a)
            by_tile = band.reshape(a, g.cols, g.tile_in)  # [a, C, b]
            q, scales = quantize_tile(by_tile.reshape(-1, g.tile_in))  # [a·C, b], [a·C]: a row per (row, tile)
            if r * g.tile_out < live_rows:
                q_arr[rows, :live_cols] = q.reshape(a, g.d_in_pad)[:, :live_cols]
                s_arr[rows, : live_cols // g.tile_in] = scales.reshape(a, g.cols)[:, : live_cols // g.tile_in]
            live = [j for j in band_workers if not g.is_padding(j)]
            for j in live:
                c = j % g.cols
                tile, norm = by_tile[:, c, :], float(np.linalg.norm(by_tile[:, c, :]))
                if norm > 0:
                    back = dequantize_tile(q.reshape(a, g.cols, g.tile_in)[:, c, :], scales.reshape(a, g.cols)[:, c])
                    worst = max(worst, float(np.linalg.norm(back - tile)) / norm)
                bytes_fp32 += tile.nbytes
                bytes_int8 += tile.size + 4 * a
            tiles += len(live)
            records[p].mark_many(band_workers)
            if progress:
                progress(skipped + tiles, total)
    adapter.update_attrs(int8={"scheme": SCHEME, "complete": True})
    return QuantReport(tiles=tiles, skipped=skipped, max_rel_error=worst,
                       bytes_fp32=bytes_fp32, bytes_int8=bytes_int8)


def int8_ready(adapter) -> bool:
    """True when ``adapter`` has finished INT8 tiles (an :class:`AdapterStore` says so in its
    ``int8`` attribute; any other tile source is trusted to serve ``read_tile_int8``)."""
    if isinstance(adapter, AdapterStore):
        info = adapter.attrs().get("int8")
        return isinstance(info, dict) and bool(info.get("complete")) and adapter.has_int8
    return True
