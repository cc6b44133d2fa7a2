"""prismoe_store: out-of-core PrisMoE adapters.

Extract big matrices into grid-chunked Zarr stores, fit three pipes of power-of-2 tiles by
streamed least squares, train top-k gates, and run the adapter with an LRU tile cache.

>>> from prismoe_store import plan_grid
>>> plan_grid(4096, 128256).tile_shape
(8192, 128)
"""

from .errors import PrismoeError
from .grid import GridSpec, plan_grid, plan_pipes
from .stores import StoreOptions, WeightsStore
from .runtime import open_runtime

__all__ = ["PrismoeError", "GridSpec", "plan_grid", "plan_pipes", "StoreOptions", "WeightsStore"]
__version__ = "0.1.0"
