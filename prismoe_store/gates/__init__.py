"""Phase 2: top-k gates trained on the frozen tiles, token routing, and reports on both.

Torch is imported only when a name here is first used: :mod:`~prismoe_store.gates.settings`
stays light for the command line.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "training": ["fit_gates"],
        "gate": ["Gates"],
        "tiles": ["FrozenTiles"],
        "settings": ["GateSettings"],
        "routing": ["Routing", "route", "k_for"],
        "report": ["routing_report", "quality_report"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.gates.gate import Gates
    from prismoe_store.gates.report import quality_report, routing_report
    from prismoe_store.gates.routing import Routing, k_for, route
    from prismoe_store.gates.settings import GateSettings
    from prismoe_store.gates.tiles import FrozenTiles
    from prismoe_store.gates.training import fit_gates
