"""Benchmarks, as ratios measured in one run (``prismoe benchmark …``).

Adapter quality and speed against the dense matrix, the fit against the machine's matmul rate,
a head against the full head, the runtime against dense ``F.linear`` and offloading.

Public names are imported on first use (``lazy_loader``).
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "adapter": ["benchmark_adapter", "BenchConfig"],
        "fit": ["benchmark_fit"],
        "head": ["benchmark_head"],
        "runtime": ["benchmark_runtime"],
    },
)

if TYPE_CHECKING:  # the same names, for type checkers
    from prismoe_store.bench.adapter import BenchConfig, benchmark_adapter
    from prismoe_store.bench.fit import benchmark_fit
    from prismoe_store.bench.head import benchmark_head
    from prismoe_store.bench.runtime import benchmark_runtime
