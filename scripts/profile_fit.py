#!/usr/bin/env python
"""Profile a whole ``prismoe fit`` command: wall seconds per stage, in this one process.

Runs the CLI's ``fit`` (the same code path as the ``prismoe`` script) after wrapping the
functions of each stage with timers, then prints one JSON object on stderr: the imports, the
command, and the seconds spent in each stage. Stages that run in threads (the stripes'
products, the prefetch thread's reading and decoding) are summed over their threads, so they
overlap the wall-clock stages that contain them (``statistics pass``).

    python scripts/profile_fit.py fit PAIRS -o ADAPTER --workers 64 --overwrite --quiet

Run it under ``/usr/bin/time -v`` for the process's peak RSS and CPU seconds; measure the
machine's matmul rate beside it (``prismoe benchmark fit`` does that for the whole command).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import zarr

import cli.main as climain

T_CLI = time.perf_counter() - T0
from importlib import import_module


def _module(*names):
    """The first of ``names`` that imports (older checkouts, profiled for comparison, had other layouts)."""
    for name in names:
        try:
            return import_module(name)
        except ImportError:
            continue
    return None


fit_mod = _module("prismoe_store.fit.job", "prismoe_store.fit")
pass_mod = _module("prismoe_store.fit.statistics", "prismoe_store.fit_pass")
pairs_mod = _module("prismoe_store.stores.pairs", "prismoe_store.pairs")
chunk_mod = _module("prismoe_store.stores.chunk_files", "prismoe_store.chunk_files")  # None: read through Zarr

T_IMPORTS = time.perf_counter() - T0
SECONDS: dict[str, float] = {}
_LOCK = threading.Lock()


def timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall seconds to ``SECONDS[label]``."""
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    is_cm = isinstance(raw, classmethod)
    fn = raw.__func__ if is_cm else raw

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with _LOCK:
                SECONDS[label] = SECONDS.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, classmethod(wrapper) if is_cm else wrapper)


def timed_iter(owner, name: str, label: str) -> None:
    """Replace generator function ``owner.name`` by one adding the wall seconds its caller waits
    for each item (the generator's own work, or its wait for a thread) to ``SECONDS[label]``."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        it = fn(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                with _LOCK:
                    SECONDS[label] = SECONDS.get(label, 0.0) + time.perf_counter() - start
            yield item

    setattr(owner, name, wrapper)


STAGES = [
    (pairs_mod.PairsStore, "open", "open the pairs store"),
    (fit_mod.AdapterStore, "create", "create the adapter"),
    (fit_mod._Fit, "_count", "count rows per set"),
    (fit_mod, "make_plan", "plan"),
    (fit_mod._Fit, "_create_scratch", "create the scratch"),
    (fit_mod._Fit, "_statistics", "statistics pass (wall)"),
    (chunk_mod.RegionReader if chunk_mod else pass_mod, "read" if chunk_mod else "_read_into",
     "  read + decode chunks (prefetch thread)"),
    (pass_mod, "_blocks", "  stripe waits for its next block (first block's read included)"),
    (pass_mod.Stats, "add", "  products (stripe threads)"),
    (pass_mod.Stats, "merge", "  reduction (merge stripes)"),
    (pass_mod.Stats, "sets", "  reduction (merge stripes)"),
    (pass_mod.Stats, "finite", "  NaN/Inf check of the statistics"),
    (zarr.Array, "__setitem__", "zarr writes (held-out rows, statistics, tiles; all stages)"),
    (fit_mod._Fit, "_solve", "solve + write tiles (wall)"),
    (fit_mod._Fit, "_factors", "  factor G + λI"),
    (fit_mod._Fit, "_metrics", "held-out metrics (wall)"),
]

if __name__ == "__main__":
    for owner, name, label in STAGES:
        if hasattr(owner, name):  # an older checkout may lack a stage's function
            (timed_iter if name == "_blocks" else timed)(owner, name, label)
    t = time.perf_counter()
    try:
        climain.main.main(args=sys.argv[1:], standalone_mode=False)
    finally:
        cmd = time.perf_counter() - t
        rows = [("imports: cli.main", T_CLI), ("imports: fit modules", T_IMPORTS - T_CLI), ("command", cmd)]
        rows += [(label, SECONDS.get(label, 0.0)) for label in dict.fromkeys(lbl for *_, lbl in STAGES)]
        print(json.dumps({"total_s": time.perf_counter() - T0, "cpu_s": time.process_time(), "stages": rows}),
              file=sys.stderr)
