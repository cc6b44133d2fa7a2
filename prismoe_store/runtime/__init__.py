"""The runtime: route tokens, load only the gated tiles into device memory, combine the pipes.

:func:`open_runtime` opens an adapter as a :class:`Runtime` (three-pipe adapters) or a
:class:`SelectRuntime` (head adapters), configured by a :class:`RuntimeConfig`; both read the
adapter through the :class:`TileSource` protocol (an ``AdapterStore`` is one; wrappers derive
from :class:`TileSourceWrapper`). :func:`dense_matrix` is the matrix a runtime computes at full
density; INT8 tiles are made by :func:`quantize_adapter`.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "open": ["open_runtime"],
        "config": ["RuntimeConfig"],
        "grouped": ["Runtime"],
        "bands": ["SelectRuntime"],
        "tile_source": ["TileSource", "BandSource", "TileSourceWrapper", "HostTiles", "UniformGate"],
        "dense": ["dense_matrix"],
        "quant": ["quantize_adapter", "int8_ready"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.runtime.bands import SelectRuntime
    from prismoe_store.runtime.dense import dense_matrix
    from prismoe_store.runtime.grouped import Runtime, RuntimeConfig
    from prismoe_store.runtime.open import open_runtime
    from prismoe_store.runtime.quant import int8_ready, quantize_adapter
    from prismoe_store.runtime.tile_source import BandSource, HostTiles, TileSource, TileSourceWrapper, UniformGate
