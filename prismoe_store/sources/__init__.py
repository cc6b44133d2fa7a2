"""Checkpoint sources: safetensors (single and sharded), ``.pt``, GGUF, ``.npy`` and model folders.

A :class:`Source` lists tensors, resolves a requested name (``lm_head`` for a tied head, say) and
reads regions as exact float values; :func:`open_source` picks the backend from what is on disk.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "base": ["Source"],
        "checkpoint": ["open_source"],
        "records": ["TensorInfo", "CheckpointFacts", "Resolution", "SourceStamp"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.sources.base import Source
    from prismoe_store.sources.checkpoint import open_source
    from prismoe_store.sources.records import CheckpointFacts, Resolution, SourceStamp, TensorInfo
