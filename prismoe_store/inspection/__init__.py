"""Inspection of any store (``prismoe inspect``) and streamed matrix comparison (``prismoe compare``).

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "common": ["inspect_store"],
        "compare": ["compare_matrices", "open_matrix"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.inspection.common import inspect_store
    from prismoe_store.inspection.compare import compare_matrices, open_matrix
