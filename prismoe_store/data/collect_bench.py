"""``prismoe benchmark collect``: collection throughput as a ratio to a bare forward pass, in one run.

>>> benchmark_collect("/nonexistent/m", None, ["t.txt"])
Traceback (most recent call last):
...
prismoe_store.errors.SourceError: no model at /nonexistent/m
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace

import numpy as np

from prismoe_store.data.collect import CollectSpec, collect
from prismoe_store.data.models import (
    check_model_paths,
    forward_pass,
    load_models,
    tokenizers_agree,
)
from prismoe_store.data.rows import work_items
from prismoe_store.data.texts import scan_texts
from prismoe_store.errors import DataError
from prismoe_store.stores.formats import StoreOptions


def benchmark_collect(upper, lower, texts, *, spec: CollectSpec = CollectSpec(), repeats: int = 3,  # noqa: B008
                      options: StoreOptions | None = None, workdir: str | os.PathLike | None = None) -> dict:
    """Collection throughput against a bare forward pass of the same model(s), in one run.

    Both sides get the same token windows (from ``texts``, capped by ``spec.max_tokens``) in the
    same batches. *bare*: the models' full forward passes only (upper, and lower when it is another
    model), on pre-tokenized ids. *collect*: :func:`collect` into a fresh store (tokenizing,
    extracting, pooling, NaN checks, store writes). Models are loaded once, outside both timings.
    The two alternate ``repeats`` times; medians are compared. Returns tokens/s of each and
    ``ratio = collect / bare``.

    >>> benchmark_collect("/nonexistent/m", None, ["t.txt"])
    Traceback (most recent call last):
    ...
    prismoe_store.errors.SourceError: no model at /nonexistent/m
    """
    check_model_paths(upper, lower)
    texts = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    sources = scan_texts(texts)
    up, lo, same = load_models(upper, lower, device=spec.device, dtype=spec.dtype, need_head=spec.target == "logits")
    shared = same or tokenizers_agree(up, lo, sources)
    pool = spec.pool if shared or spec.pool != "none" else "last"
    windows, total = [], 0
    for src in sources:
        for it in work_items(src, {"done": []}, up, lo, shared=shared, pool=pool, max_length=spec.max_length,
                         timer={"tokenize": 0.0}):
            windows.append(it)
            total += len(it.upper)
            if spec.max_tokens is not None and total >= spec.max_tokens:
                break
        if spec.max_tokens is not None and total >= spec.max_tokens:
            break
    bs = spec.batch_size

    def bare() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(windows), bs):
            chunk = windows[i:i + bs]
            forward_pass(up, [w.upper for w in chunk], layers=(), logits=True)
            if not same:
                forward_pass(lo, [w.lower for w in chunk], layers=(), logits=True)
        return time.perf_counter() - t0

    bare()  # warm-up (allocator, kernels)
    bare_s, coll_s, last = [], [], None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for r in range(repeats):
            bare_s.append(bare())
            t0 = time.perf_counter()
            last = collect(up, up if same else lo, texts, os.path.join(tmp, f"pairs{r}"),
                           spec=replace(spec, max_tokens=total), options=options, overwrite=True)
            coll_s.append(time.perf_counter() - t0)
    if last is None:
        raise DataError(f"repeats must be at least 1, got {repeats}")
    b, c = float(np.median(bare_s)), float(np.median(coll_s))
    return {
        "tokens": total, "windows": len(windows), "batch_size": bs, "max_length": spec.max_length,
        "target": spec.target, "pool": pool, "same_model": same, "rows": last.rows_added,
        "compressor": (options or StoreOptions()).compressor,
        "widths": list(spec.collector(up, lo, same).widths()),
        "bare_tokens_per_s": total / b, "collect_tokens_per_s": last.tokens_added / c,
        "ratio": (last.tokens_added / c) / (total / b),
        "bare_seconds": bare_s, "collect_seconds": coll_s, "collect_phases": last.seconds,
    }


def format_benchmark_collect(result: dict) -> str:
    """The text of :func:`benchmark_collect`: what was run, the two rates and their ratio, the phases."""
    return "\n".join([
        f"{result['tokens']} tokens in {result['windows']} sequences (batch {result['batch_size']}, "
        f"length <= {result['max_length']}), target {result['target']}, pool {result['pool']}, "
        f"pairs {result['widths'][0]}->{result['widths'][1]}, compressor {result['compressor']}",
        f"bare forward: {result['bare_tokens_per_s']:.0f} tokens/s; collect: "
        f"{result['collect_tokens_per_s']:.0f} tokens/s; ratio collect/bare = {result['ratio']:.3f}",
        "collect phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["collect_phases"].items())])

