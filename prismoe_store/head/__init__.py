"""Sparse heads: a model's ``lm_head`` as bands of vocabulary rows behind a band gate.

:func:`build_head` orders the vocabulary and writes the bands, :func:`fit_band_gate` trains the
gate from hidden states, :class:`PrisMoEHead` stands in for the model's ``lm_head``.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "build": ["build_head", "HeadConfig"],
        "band_gate": ["fit_band_gate", "BandGateConfig"],
        "generate": ["PrisMoEHead", "generate", "replace_lm_head"],
        "vocab_order": ["OrderConfig"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.head.band_gate import BandGateConfig, fit_band_gate
    from prismoe_store.head.build import HeadConfig, build_head
    from prismoe_store.head.generate import PrisMoEHead, generate, replace_lm_head
    from prismoe_store.head.vocab_order import OrderConfig
