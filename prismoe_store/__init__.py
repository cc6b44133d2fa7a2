"""prismoe_store: out-of-core PrisMoE adapters.

Extract big matrices into grid-chunked Zarr stores, fit three pipes of power-of-2 tiles by
streamed least squares, train top-k gates, and run the adapter with an LRU tile cache.

The modules that need torch or Dask are imported on first use, so ``import prismoe_store`` (and
every ``prismoe`` command that does not need them) stays light.

>>> from prismoe_store import plan_grid
>>> plan_grid(4096, 128256).tile_shape
(8192, 128)
"""

import sys
import types
from importlib import import_module

from prismoe_store.errors import PrismoeError
from prismoe_store.grid import GridSpec, plan_grid, plan_pipes
from prismoe_store.stores.formats import StoreOptions  # light: no torch, no Dask
from prismoe_store.stores.weights import WeightsStore

# public name -> module that defines it (imported lazily)
_LAZY = {
    "PairsStore": "stores",
    "AdapterStore": "stores",
    "extract": "data",
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


class _Package(types.ModuleType):
    """The package module: ``prismoe_store.fit`` stays the function.

    It shares its name with the sub-package that defines it, and importing a sub-package sets it
    as an attribute of the package, which would shadow the lazily imported function
    (``from prismoe_store import fit`` would give the package). The sub-package stays importable
    as ``from prismoe_store.fit import ...``.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in [n for n, v in list(globals().items()) if isinstance(v, types.ModuleType) and _LAZY.get(n) == n]:
    del globals()[_name]  # a same-named module imported while this file ran
