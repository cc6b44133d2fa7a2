"""Phase 1: the one-shot streaming least-squares fit of the three pipes' tiles (DESIGN.md §4).

One pass over the pairs gathers ``G = XᵀX`` and ``B = XᵀZ`` (map → reduce), then small ridge
solves write the tiles; held-out metrics are stored in the adapter.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "job": ["fit"],
        "solve": ["describe_ridge"],
        "config": ["FitConfig"],
        "runner": ["keep_freed_memory"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.fit.config import FitConfig
    from prismoe_store.fit.job import fit
    from prismoe_store.fit.runner import keep_freed_memory
    from prismoe_store.fit.solve import describe_ridge
