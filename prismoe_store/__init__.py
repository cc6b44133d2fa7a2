"""prismoe_store: out-of-core PrisMoE adapters.

Extract big matrices into grid-chunked Zarr stores, fit three pipes of power-of-2 tiles by
streamed least squares, train top-k gates, and run the adapter with an LRU tile cache.

The modules that need torch or Dask are imported on first use, so ``import prismoe_store`` (and
every ``prismoe`` command that does not need them) stays light.

>>> from prismoe_store import plan_grid
>>> plan_grid(4096, 128256).tile_shape
(8192, 128)
"""

from importlib import import_module

from .errors import PrismoeError
from .grid import GridSpec, plan_grid, plan_pipes
from .stores import StoreOptions, WeightsStore

# public name -> module that defines it (imported lazily)
_LAZY = {
    "PairsStore": "pairs",
    "AdapterStore": "adapter",
    "extract": "extract",
    "fit": "fit",
    "fit_gates": "gates",
    "open_runtime": "runtime",
    "PrisMoEHead": "head",
}

__all__ = ["PrismoeError", "GridSpec", "plan_grid", "plan_pipes", "StoreOptions", "WeightsStore", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prismoe_store' has no attribute {name!r}")
