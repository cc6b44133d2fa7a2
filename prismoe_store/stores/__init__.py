"""The stores: chunked Zarr v3 groups that hold weights, activation pairs and adapters.

Every store is self-describing (a format tag and version), verified chunk by chunk (CRC records),
and written by resumable jobs (progress records). See docs/store-format.md.

Public names are imported on first use (``lazy_loader``).

>>> from prismoe_store.stores import PairsStore
>>> PairsStore.create("memory://doc-stores", d_in=4, d_out=2, overwrite=True).rows
0
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "base": ["StoreOptions", "WeightsStore", "TensorWriter", "Progress", "job_lock", "store_exists", "recheck"],
        "adapter": ["AdapterStore"],
        "pairs": ["PairsStore", "open_rows"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.stores.base import Progress, StoreOptions, TensorWriter, WeightsStore, job_lock, recheck, store_exists
    from prismoe_store.stores.adapter import AdapterStore
    from prismoe_store.stores.pairs import PairsStore, open_rows
