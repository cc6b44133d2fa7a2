"""The resumable state of a gate training in an adapter store (fitted adapters' gates and head
adapters' band gate alike): after every epoch :func:`save_state` writes the arrays (parameters,
Adam's moments, the best gate so far) into whichever of two slots of the ``_gates_training`` group
is not current, then the attributes — the run's record and the current slot's number — last, so a
kill at any moment leaves one whole state (docs/gates.md "Resume"). :func:`load_state` reads the
current one back.

>>> import numpy as np
>>> from prismoe_store.grid import plan_grid
>>> from prismoe_store.stores.adapter import AdapterStore
>>> a = AdapterStore.create("memory://doc-state", grids=[plan_grid(4, 4, 2)], overwrite=True)
>>> load_state(a, "state") is None
True
>>> save_state(a, {"w": np.ones((2, 2), np.float32)}, {"epoch": 1})
>>> meta, arrays = load_state(a, "state")
>>> meta["epoch"], meta["slot"], float(arrays["w"].sum())
(1, 0, 4.0)
"""

from __future__ import annotations

import numpy as np

from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import create_chunked
from prismoe_store.stores.verified import reading

STATE_GROUP = "_gates_training"  # adapter group holding the resumable training state


def save_state(adapter: AdapterStore, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` (as float32) into the free slot, then ``meta`` and the slot's number (metadata last)."""
    root = adapter.group.require_group(STATE_GROUP)
    slot = 1 - int(root.attrs.get("slot", 1))
    grp = root.require_group(f"slot{slot}")
    for name, data in arrays.items():
        data = np.asarray(data, np.float32)
        if name in grp and grp[name].shape == data.shape:
            grp[name][...] = data
        else:
            create_chunked(grp, name, data.shape, data.shape, "float32", adapter.options, overwrite=True)[...] = data
    root.attrs.update({**meta, "slot": slot})


def state_meta(adapter: AdapterStore) -> dict | None:
    """The saved state's attributes (its record and slot), or ``None`` when there is none; reads no array."""
    if STATE_GROUP not in adapter.group or "slot" not in adapter.group[STATE_GROUP].attrs:
        return None
    return dict(adapter.group[STATE_GROUP].attrs)


def load_state(adapter: AdapterStore, what: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """``(meta, arrays)`` of the saved state, or ``None`` when there is none; ``what`` names it in
    the error a damaged slot raises (:class:`~prismoe_store.errors.CorruptStoreError`)."""
    meta = state_meta(adapter)
    if meta is None:
        return None
    slot = adapter.group[STATE_GROUP][f"slot{meta['slot']}"]
    with reading(f"{what} in {adapter.url}"):
        arrays = {name: np.asarray(arr[...]) for name, arr in slot.arrays()}
    return meta, arrays
