"""How a runtime runs: :class:`RuntimeConfig`, the shared constants, and the input rows.

Both runtimes (:class:`~prismoe_store.runtime.grouped.Runtime` over fitted adapters and
:class:`~prismoe_store.runtime.bands.SelectRuntime` over head adapters) take a
:class:`RuntimeConfig`, size their host tier with :func:`host_budget` and turn their input into
float32 rows with :func:`input_rows`.

``schedule`` is how the pipes share the device budget (``"parallel"``: side by side;
``"serial"``: one pipe's tiles at a time) — not the adapter's ``mode`` (``"joint"`` or
``"independent"``: how gate weights combine a band's tiles), which the runtime reads from the
adapter.

>>> RuntimeConfig(schedule="serial", quant="int8").schedule
'serial'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prismoe_store.errors import DataError

QUANTS = (None, "int8")
SCHEDULES = ("parallel", "serial")
EVICTIONS = ("heat", "lru")
DEFAULT_SPARSITY = 0.3  # ρ for adapters whose gates do not record one
GATHER_BYTES = 32 << 20  # most bytes of tiles gathered for one batched product
CHUNK_BYTES = 4 << 20  # most bytes of gathered inputs and products of one grouped product (cache-sized)
HOST_TIER_BYTES = 4 << 30  # default host-tier budget when tiles live on an accelerator
HEAT_DECAY = 0.99  # per call: how fast a tile's selection count fades (eviction and prefetch rank by it)


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime runs an adapter (validated on construction: :class:`DataError`).

    >>> RuntimeConfig(device="cpu", cache_bytes=1 << 20).cache_bytes
    1048576
    """

    device: str = "cpu"  # where tiles live and are multiplied: "cpu", "cuda", "cuda:1", ...
    cache_bytes: int | None = None  # tile cache budget in bytes; None: room for every non-padding tile
    quant: str | None = None  # None: float32 tiles; "int8": INT8 tiles + per-row scales
    schedule: str = "parallel"  # "parallel": pipes share the cache; "serial": one pipe's tiles at a time
    sparsity: float | None = None  # ρ; None: the ρ `fit-gates` recorded, else 1.0 without gates, else 0.3
    host_cache_bytes: int | None = None  # host-RAM tier of decompressed tiles; None: every tile up to
    # 4 GiB on an accelerator, none on the CPU (the slots are host memory there)
    prefetch: bool | None = None  # read the hottest tiles not on the device into the host tier on a
    # background thread after each call; None: whenever there is a host tier
    eviction: str = "heat"  # which resident tile a miss replaces: "heat" (the least often selected lately,
    # ties by recency) or "lru" (the least recently used)
    mass: float | None = None  # head adapters: take the fewest bands whose predicted mass reaches this
    # (at most ρ of them); None: a fixed ρ of the bands per token

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise DataError(f"quant must be None or 'int8', got {self.quant!r}")
        if self.eviction not in EVICTIONS:
            raise DataError(f"eviction must be 'heat' or 'lru', got {self.eviction!r}")
        if self.schedule not in SCHEDULES:
            raise DataError(f"schedule must be 'parallel' or 'serial', got {self.schedule!r}")
        if self.sparsity is not None and not 0.0 < float(self.sparsity) <= 1.0:
            raise DataError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.mass is not None and not 0.0 < float(self.mass) <= 1.0:
            raise DataError(f"mass must be in (0, 1], got {self.mass}")
        bad_budget = not isinstance(self.cache_bytes, (int, np.integer)) or self.cache_bytes < 1
        if self.cache_bytes is not None and bad_budget:
            raise DataError(f"cache_bytes must be a positive integer, got {self.cache_bytes!r}")
        bad_host = not isinstance(self.host_cache_bytes, (int, np.integer)) or self.host_cache_bytes < 0
        if self.host_cache_bytes is not None and bad_host:
            raise DataError(f"host_cache_bytes must be a non-negative integer, got {self.host_cache_bytes!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise DataError(f"bad device {self.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DataError("device 'cuda' asked for but CUDA is not available: use --device cpu")


def host_budget(config: RuntimeConfig, device: torch.device, total_bytes: int) -> int:
    """Bytes of the host tier: ``config.host_cache_bytes``, else every tile up to ``HOST_TIER_BYTES``
    when the device is not the host (on the CPU the slots are host memory already: no tier).

    >>> host_budget(RuntimeConfig(), torch.device("cpu"), 1 << 20), host_budget(
    ...     RuntimeConfig(host_cache_bytes=8), torch.device("cpu"), 1 << 20)
    (0, 8)
    """
    if config.host_cache_bytes is not None:
        return int(config.host_cache_bytes)
    return min(total_bytes, HOST_TIER_BYTES) if device.type != "cpu" else 0


def input_rows(x, d_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Size]:
    """``(rows [B, d_in] float32 on device, lead shape)`` of an input ``x [..., d_in]`` (torch or
    numpy, a read-only memmap too); raises :class:`DataError` for a wrong width or NaN/Inf.

    >>> rows, lead = input_rows(np.ones((2, 3, 4), np.float32), 4, torch.device("cpu"))
    >>> tuple(rows.shape), tuple(lead)
    ((6, 4), (2, 3))
    """
    if isinstance(x, np.ndarray):  # numpy: a float32 tensor over a copy when the array is read-only
        x = torch.from_numpy(np.array(x, np.float32, copy=not x.flags.writeable or None))
    x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise DataError(f"input must be [..., {d_in}], got {tuple(x.shape)}")
    rows = x.reshape(-1, d_in).to(device, torch.float32)  # [B, d_in]
    if not bool(torch.isfinite(rows).all()):
        raise DataError("input holds NaN or Inf")
    return rows, x.shape[:-1]
