"""The runtime: route tokens, load only the gated tiles into device memory, combine the pipes.

:func:`open_runtime` opens an adapter store as a :class:`Runtime` (three-pipe adapters) or a
:class:`SelectRuntime` (head adapters); INT8 tiles are made by :func:`quantize_adapter`.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "grouped": ["open_runtime", "Runtime", "RuntimeConfig"],
        "bands": ["SelectRuntime"],
        "quant": ["quantize_adapter", "int8_ready"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.runtime.bands import SelectRuntime
    from prismoe_store.runtime.grouped import Runtime, RuntimeConfig, open_runtime
    from prismoe_store.runtime.quant import int8_ready, quantize_adapter
