"""Speed as ratios to a dense ``F.linear`` timed in the same interleaved loop.

Each sample is a block of back-to-back calls lasting about ``MIN_BLOCK_S`` (a microsecond
``F.linear`` is timed in its steady state, not cold after the other method ran); medians of the
repeats are reported.

>>> import torch
>>> s = speed_against_dense(lambda t: t * 2, lambda t: t + 1, torch.ones(1, 4), torch.ones(8, 4), repeats=1)
>>> sorted(s)[:3]
['dense_latency_s', 'dense_throughput_tok_s', 'latency_s']
>>> sorted(s)[3:]
['latency_vs_dense', 'throughput_tok_s', 'throughput_vs_dense']
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from prismoe_store.fit.runner import keep_freed_memory

GLIBC_DEFAULT = 128 << 10  # glibc's default trim and mmap thresholds, bytes
MIN_BLOCK_S = 2e-3  # a timing sample is a block of back-to-back calls lasting about this long
MAX_INNER = 1000  # most calls in one timing block


@contextmanager
def steady_heap() -> Iterator[str]:
    """While timing, let glibc's malloc keep freed memory mapped for reuse, as jemalloc and
    tcmalloc do (:func:`~prismoe_store.fit.runner.keep_freed_memory`); yields a line that says which
    allocator setting the timings ran under.

    By default glibc hands the top of its heap back to the kernel whenever more than a threshold
    (128 KiB, raised on the fly) lies free there, and the next allocation faults those pages in
    again, zero-filled. Which call pays depends on where the allocator happened to put its
    blocks: freeing a 192 KiB logits row of SmolLM2's head took 2–5 ms in some processes and
    nothing in others, and batch-1 timings doubled at random. Inside, every method is timed alike
    with freed memory kept; on exit the thresholds go back to glibc's defaults (``GLIBC_DEFAULT``,
    without its raising them on the fly). Elsewhere (no glibc) nothing changes.

    >>> with steady_heap() as how:
    ...     how.startswith(("freed memory kept", "the default"))
    True
    """
    if not keep_freed_memory():
        yield "the default allocator (not glibc: its trimming left as it is)"
        return
    try:
        yield ("freed memory kept for reuse by glibc's malloc, as jemalloc and tcmalloc do, for every method alike "
               "(by default it hands freed pages back and the next call pays to fault them in again)")
    finally:
        keep_freed_memory(mmap_threshold=GLIBC_DEFAULT, trim_threshold=GLIBC_DEFAULT)


def timed(fn, x: torch.Tensor, sync, inner: int = 1) -> float:
    """Seconds per call of ``fn(x)``, over ``inner`` back-to-back calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn(x)
    sync()
    return (time.perf_counter() - t0) / inner


def speed_against_dense(fn, dense, x1: torch.Tensor, xb: torch.Tensor, repeats: int) -> dict:
    """Median latency (batch 1) and throughput (batch ``len(xb)``) of ``fn`` and of ``dense``, timed
    interleaved (dense, fn, dense, fn, ...) so that both see the same machine load. Each sample is a
    block of back-to-back calls lasting about ``MIN_BLOCK_S`` (so a microsecond ``F.linear`` is timed
    in its steady state, not cold after the other method ran), under :func:`steady_heap`."""
    sync = torch.cuda.synchronize if x1.is_cuda else (lambda: None)
    with torch.no_grad(), steady_heap():
        inner = {}
        for name, f, x in (("d1", dense, x1), ("f1", fn, x1), ("db", dense, xb), ("fb", fn, xb)):
            f(x)  # warm
            once = timed(f, x, sync)
            inner[name] = max(1, min(MAX_INNER, math.ceil(MIN_BLOCK_S / max(once, 1e-9))))
        t: dict[str, list[float]] = {k: [] for k in inner}
        for _ in range(repeats):
            t["d1"].append(timed(dense, x1, sync, inner["d1"]))
            t["f1"].append(timed(fn, x1, sync, inner["f1"]))
            t["db"].append(timed(dense, xb, sync, inner["db"]))
            t["fb"].append(timed(fn, xb, sync, inner["fb"]))
    m = {k: statistics.median(v) for k, v in t.items()}
    n = xb.shape[0]
    return {"latency_s": m["f1"], "dense_latency_s": m["d1"], "latency_vs_dense": m["f1"] / m["d1"],
            "throughput_tok_s": n / m["fb"], "dense_throughput_tok_s": n / m["db"],
            "throughput_vs_dense": m["db"] / m["fb"]}
