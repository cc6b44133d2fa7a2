"""The stores: chunked Zarr v3 groups that hold weights, activation pairs and adapters.

Every store is self-describing (a format tag and version: ``formats``), verified chunk by chunk
(CRC records: ``verified``), written by resumable jobs (progress records: ``progress``), and keeps
typed records of how it was made (``records``). The stores: ``weights``, ``pairs``, ``adapter``
(with ``adapter_bands`` for head adapters). See docs/store-format.md.

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
        "formats": ["StoreOptions", "job_lock", "store_exists"],
        "progress": ["Progress", "recheck"],
        "weights": ["WeightsStore", "TensorWriter"],
        "records": ["FitRecord", "FitMetrics", "GatesRecord", "TensorRecord"],
        "adapter": ["AdapterStore"],
        "pairs": ["PairsStore", "open_rows"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.stores.adapter import AdapterStore
    from prismoe_store.stores.formats import StoreOptions, job_lock, store_exists
    from prismoe_store.stores.pairs import PairsStore, open_rows
    from prismoe_store.stores.progress import Progress, recheck
    from prismoe_store.stores.records import FitMetrics, FitRecord, GatesRecord, TensorRecord
    from prismoe_store.stores.weights import TensorWriter, WeightsStore
