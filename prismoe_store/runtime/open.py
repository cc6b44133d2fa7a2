"""Open the runtime an adapter needs: :func:`open_runtime`.

A head adapter (``partition`` layout, built by ``prismoe head``) gets a
:class:`~prismoe_store.runtime.bands.SelectRuntime`; a fitted adapter a
:class:`~prismoe_store.runtime.grouped.Runtime`. Both read the adapter through the
:class:`~prismoe_store.runtime.tile_source.TileSource` protocol.

>>> import torch
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores.adapter import AdapterStore
>>> a = AdapterStore.create("memory://doc-open-rt", grids=[plan_grid(4, 4, 4)], overwrite=True,
...                         attrs={"complete": True})
>>> open_runtime(a, schedule="serial")(torch.ones(4)).shape
torch.Size([4])
"""

from __future__ import annotations

import os
from typing import cast

from prismoe_store.errors import DataError
from prismoe_store.runtime.bands import SelectRuntime
from prismoe_store.runtime.config import RuntimeConfig
from prismoe_store.runtime.grouped import Runtime
from prismoe_store.runtime.tile_source import BandSource, TileSource
from prismoe_store.stores.adapter import AdapterStore


def open_runtime(adapter: TileSource | str | os.PathLike, *, device: str = "cpu", cache_bytes: int | None = None,
                 quant: str | None = None, schedule: str = "parallel", sparsity: float | None = None,
                 prefetch: bool | None = None, mass: float | None = None, host_cache_bytes: int | None = None,
                 eviction: str = "heat") -> Runtime | SelectRuntime:
    """Open a runtime over ``adapter`` (a path/URL of a finished adapter store, or any
    :class:`TileSource`); the options are the fields of :class:`RuntimeConfig`.

    Raises :class:`DataError` for bad options (and ``mass`` on a fitted adapter),
    :class:`~prismoe_store.errors.IncompleteStoreError` for an unfinished store.
    """
    if isinstance(adapter, (str, os.PathLike)):
        adapter = AdapterStore.open(adapter, require_complete=True)
    config = RuntimeConfig(device=device, cache_bytes=cache_bytes, quant=quant, schedule=schedule, sparsity=sparsity,
                           prefetch=prefetch, mass=mass, host_cache_bytes=host_cache_bytes, eviction=eviction)
    if adapter.layout == "partition":  # a head adapter: a BandSource
        return SelectRuntime(cast(BandSource, adapter), config)
    if mass is not None:
        raise DataError("a mass threshold applies to head adapters (`prismoe head`), not to fitted adapters")
    return Runtime(adapter, config)
