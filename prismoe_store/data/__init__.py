"""The data stage: matrices into weights stores, activation pairs into pairs stores.

:func:`extract` streams a checkpoint's tensor into a weights store; :func:`collect` runs real
models over texts and writes activation pairs; :func:`synthesize` writes pairs with a known truth.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "extract": ["extract", "tile"],
        "collect": ["collect", "CollectSpec"],
        "models": ["load_model"],
        "synth": ["synthesize", "SynthSpec", "load_truth"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.data.collect import CollectSpec, collect
    from prismoe_store.data.extract import extract, tile
    from prismoe_store.data.models import load_model
    from prismoe_store.data.synth import SynthSpec, load_truth, synthesize
