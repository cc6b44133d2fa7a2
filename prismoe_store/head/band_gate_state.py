"""The resumable state of a head adapter's band-gate training (``prismoe fit-gates`` on a head).

After every epoch :func:`save_state` writes the gate, Adam's moments and step, the best gate so far
and the run's record (epoch, target epochs, history, the settings a resumed run must share) into
the adapter's ``_gates_training`` group: the arrays into whichever of two slots is not current,
then the attributes naming the current slot, last — the same scheme as a fitted adapter's gate
training (:mod:`prismoe_store.gates.training`, docs/gates.md "Resume"). :func:`load_state` reads
it back; :func:`saved_run` is the cheap summary the CLI reads before starting.

>>> import numpy as np, tempfile, os
>>> from prismoe_store.head.build import HeadConfig, build_head
>>> d = tempfile.mkdtemp()
>>> np.save(os.path.join(d, "w.npy"), np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
>>> _ = build_head(os.path.join(d, "w.npy"), os.path.join(d, "a.zarr"), config=HeadConfig(band_rows=8))
>>> a = AdapterStore.open(os.path.join(d, "a.zarr"), "r+")
>>> saved_run(a) is None
True
>>> save_state(a, {"weight": np.zeros((8, 8), np.float32)}, {"epoch": 2, "epochs": 5, "settings": {}})
>>> saved_run(a)
{'epoch': 2, 'epochs': 5, 'finished': False}
"""

from __future__ import annotations

import numpy as np

from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import create_chunked
from prismoe_store.stores.verified import reading

STATE_GROUP = "_gates_training"  # adapter group holding the resumable training state


def save_state(adapter: AdapterStore, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` into the free slot, then ``meta`` and the slot's number (metadata last)."""
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


def load_state(adapter: AdapterStore) -> tuple[dict, dict[str, np.ndarray]] | None:
    """``(meta, arrays)`` of the saved run, or ``None`` when there is none."""
    if STATE_GROUP not in adapter.group or "slot" not in adapter.group[STATE_GROUP].attrs:
        return None
    root = adapter.group[STATE_GROUP]
    meta = dict(root.attrs)
    with reading(f"band-gate training state in {adapter.url}"):
        arrays = {name: np.asarray(arr[...]) for name, arr in root[f"slot{meta['slot']}"].arrays()}
    return meta, arrays


def saved_run(adapter: AdapterStore) -> dict | None:
    """``{"epoch", "epochs", "finished"}`` of the saved run (epochs done, the run's target, whether
    it reached it), or ``None``; reads attributes only."""
    if STATE_GROUP not in adapter.group:
        return None
    attrs = adapter.group[STATE_GROUP].attrs
    if "slot" not in attrs:
        return None
    epoch, epochs = int(attrs["epoch"]), int(attrs["epochs"])
    return {"epoch": epoch, "epochs": epochs, "finished": epoch >= epochs}
