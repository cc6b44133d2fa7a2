"""Committing collected rows: a buffered pairs-store writer on a background thread.

:class:`PairsWriter` buffers finished batches of ``(x, z)`` rows with the bookkeeping of what they
finish (which documents are done, the window a run stopped in, token counts) and appends them to
the pairs store in one atomic commit per about one row chunk, rows and provenance together, on a
background thread that overlaps the next forward passes.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from prismoe_store.data.rows import WorkItem
from prismoe_store.data.texts import add_range
from prismoe_store.stores.pairs import PairsStore


class PairsWriter:
    """Buffers finished batches and appends them, with their bookkeeping, in one commit per about
    ``rows_per_chunk`` rows (fewer partial-chunk rewrites than a commit per batch).

    Appends run on one background thread, so the store write of one buffer overlaps the forward
    passes of the next (at most one append in flight; its error surfaces at the next flush or at
    :meth:`close`). An interrupted run loses at most the uncommitted rows, which the committed
    bookkeeping does not claim.
    """

    def __init__(self, store: PairsStore, texts: dict, tokens: int, tokens_lower: int, timer: dict):
        self.store, self.texts, self.timer = store, texts, timer
        self.tokens, self.tokens_lower = tokens, tokens_lower  # totals including the buffer
        self.rows_added = 0  # rows appended to the store by this writer (committed)
        self.tokens_added = 0  # upper-model tokens of the batches added
        self.documents_added = 0  # documents the batches added finished
        self.xs: list[np.ndarray] = []
        self.zs: list[np.ndarray] = []
        self.buffered = 0  # rows in the buffer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prismoe-collect-writer")
        self._pending: Future | None = None

    def add(self, entry: dict, batch: list[WorkItem], x: np.ndarray, z: np.ndarray) -> int:
        """Buffer a batch's rows and record what it finished; returns the documents it finished."""
        n_up = sum(b.new_tokens for b in batch)
        n_lo = sum(len(b.lower) - b.skip if b.lower is b.upper else len(b.lower) for b in batch)
        finished = sorted({b.doc for b in batch if b.window == b.windows - 1 and b.full})
        for d in finished:
            entry["done"] = add_range(entry["done"], d, d + 1)
        tail = batch[-1]
        if not tail.full:  # cut by the max_tokens cap: the next run starts inside this window
            entry["partial"] = [tail.doc, tail.window, len(tail.upper)]
        else:
            entry["partial"] = [tail.doc, tail.window + 1] if tail.window < tail.windows - 1 else None
        entry["tokens"] += n_up
        entry["tokens_lower"] += n_lo
        entry["rows"] += len(x)
        self.tokens += n_up
        self.tokens_lower += n_lo
        self.xs.append(x)
        self.zs.append(z)
        self.buffered += len(x)
        self.tokens_added += n_up
        self.documents_added += len(finished)
        if self.buffered >= self.store.rows_per_chunk:
            self.flush()
        return len(finished)

    def flush(self) -> None:
        """Hand the buffer, with a snapshot of the bookkeeping so far, to the writer thread."""
        if not self.xs:
            return
        x, z = np.concatenate(self.xs), np.concatenate(self.zs)
        provenance = json.loads(json.dumps({"texts": self.texts, "tokens": self.tokens,
                                            "tokens_lower": self.tokens_lower}))
        self.xs, self.zs, self.buffered = [], [], 0
        self._wait()
        self._pending = self._pool.submit(self._append, x, z, provenance)

    def _append(self, x: np.ndarray, z: np.ndarray, provenance: dict) -> None:
        t0 = time.perf_counter()
        self.store.append(x, z, provenance=provenance)
        self.rows_added += len(x)
        self.timer["write"] += time.perf_counter() - t0

    def _wait(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            try:
                pending.result()
            finally:
                self.timer["write_wait"] += time.perf_counter() - t0

    def close(self) -> None:
        """Flush, wait for the last append, stop the thread."""
        try:
            self.flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
