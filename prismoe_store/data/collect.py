"""Collect activation pairs from real models into a pairs store (``prismoe collect``).

``x`` is a hidden state of the *upper* model, ``z`` the target the adapter must produce, taken
from the *lower* model (which may be the same model):

- ``target="logits"``: the lower model's head output at the same position (what an ``lm_head``
  adapter must reproduce);
- ``target="embeddings"``: the lower model's input embedding of the *next* token (the last token of
  a document has no next token and gives no pair);
- ``target="hidden"``: a hidden state of the lower model (``lower_layer``, default the last);
- ``target="none"``: no z at all — a store of hidden states only (``d_out = 0``), what a head
  adapter's gate trains on (``prismoe fit-gates HEAD HIDDEN``).

Layers index the model's ``hidden_states`` tuple: ``0`` is the embedding output, ``i`` the output of
decoder block ``i``, and the last (``-1``, the default) is **after the final norm**. transformers
guarantees that last entry: in 5.x ``capture_outputs(tie_last_hidden_states=True)`` overwrites
``hidden_states[-1]`` with ``last_hidden_state`` (post-norm), and 4.x Llama-like models append the
normed state. The tests check it: with ``upper == lower`` and logits, ``z == x @ lm_head.weightᵀ``.

Texts are plain-text files (one document per non-blank line) or JSONL (``.jsonl``/``.ndjson``, one
object with a ``"text"`` string per line). With ``pool="none"`` every token gives a pair; a
document longer than ``max_length`` tokens is cut into windows of ``max_length`` tokens, each run
with a fresh context. With ``pool="last"|"mean"`` a document (truncated to ``max_length`` tokens)
gives one pair: the last position's, or the mean over positions. When the two tokenizers do not
encode the texts identically, positions cannot be matched, so ``pool="none"`` switches to
``"last"`` (both models then predict what follows the document) and the caller is told.

Work is committed in whole batches, about one row chunk of the store at a time, by a background
thread that overlaps the next forward passes: the rows, and in the same atomic commit the
provenance record of which ``(text, document)`` ranges are done (and how many windows of a
half-done long document). Re-running the same command skips what is done, so an interrupted
collection resumes (an error or Ctrl-C still commits the finished batches), and ``max_tokens`` (a
cap on the *store's* total of upper-model tokens) grows a store in steps. One collector per store
at a time.

The parts: :mod:`~prismoe_store.data.texts` (text files, documents, done ranges),
:mod:`~prismoe_store.data.models` (loading and running the models), :mod:`~prismoe_store.data.rows`
(windows of work and the rows they give), :mod:`~prismoe_store.data.pairs_writer` (the commits);
the throughput benchmark is :mod:`~prismoe_store.data.collect_bench`.

>>> CollectSpec(target="embeddings", pool="mean").pool
'mean'
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prismoe_store.data.models import (
    DTYPES,
    LoadedModel,
    check_model_paths,
    load_models,
    tokenizers_agree,
)
from prismoe_store.data.pairs_writer import PairsWriter
from prismoe_store.data.rows import RowCollector, WorkItem, cut_item, work_items
from prismoe_store.data.texts import count_done, scan_texts
from prismoe_store.errors import CorruptStoreError, DataError
from prismoe_store.stores.formats import StoreOptions, check_output
from prismoe_store.stores.pairs import NONFINITE_CHOICES, PAIRS_FORMAT, PairsStore, screen_nonfinite

TARGETS = ("logits", "embeddings", "hidden", "none")
POOLS = ("none", "last", "mean")
NONFINITE = NONFINITE_CHOICES  # the pairs store's NaN/Inf policies: error, drop, zero

Progress = Callable[[int, int | None], None]  # progress(done, total); total None while unknown
Notice = Callable[[str], None]  # notice(message)


@dataclass(frozen=True)
class CollectSpec:
    """What to collect and how.

    >>> CollectSpec(batch_size=0)
    Traceback (most recent call last):
    ...
    prismoe_store.errors.DataError: batch_size must be a positive integer, got 0
    """

    layer: int = -1  # upper model's hidden_states index (-1: the last, after the final norm)
    target: str = "logits"  # what z is: logits | embeddings | hidden | none (hidden states only)
    lower_layer: int = -1  # lower model's hidden_states index, for target="hidden"
    pool: str = "none"  # none: a pair per token; last / mean: a pair per document
    batch_size: int = 8  # sequences (windows or documents) per forward pass
    max_length: int = 512  # tokens per sequence: longer documents are windowed (none) or truncated (pooled)
    max_tokens: int | None = None  # stop once the store holds this many upper-model tokens (all runs)
    device: str = "cpu"  # torch device: cpu, cuda, cuda:N, or auto (cuda when present)
    dtype: str = "float32"  # compute dtype of the models; pairs are always stored float32
    on_nonfinite: str = "error"  # pairs with NaN/Inf: error (stop), drop (skip), zero (zero both rows)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise DataError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.pool not in POOLS:
            raise DataError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.dtype not in DTYPES:
            raise DataError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.on_nonfinite not in NONFINITE:
            raise DataError(f"on_nonfinite must be one of {', '.join(NONFINITE)}, got {self.on_nonfinite!r}")
        for name in ("batch_size", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if self.max_length < 2 and self.target == "embeddings":
            raise DataError("target embeddings needs max_length >= 2 (a token and its successor)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise DataError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("layer", "lower_layer"):
            if not isinstance(getattr(self, name), int):
                raise DataError(f"{name} must be an integer, got {getattr(self, name)!r}")

    def collector(self, upper: LoadedModel, lower: LoadedModel, same_model: bool) -> RowCollector:
        """The :class:`~prismoe_store.data.rows.RowCollector` of these settings for loaded models."""
        return RowCollector(upper, lower, target=self.target, layer=self.layer, lower_layer=self.lower_layer,
                            same_model=same_model)


@dataclass
class CollectReport:
    """What one :func:`collect` call did (counts for this run unless named ``*_total``)."""

    out: str  # the pairs store
    rows_added: int = 0  # pairs appended by this run
    rows_total: int = 0  # pairs in the store afterwards
    tokens_added: int = 0  # upper-model tokens run by this run
    tokens_total: int = 0  # upper-model tokens in the store afterwards
    documents_added: int = 0  # documents finished by this run
    documents_skipped: int = 0  # documents already done by earlier runs
    documents_total: int = 0  # documents in the texts
    pool: str = "none"  # the pooling used (may differ from the one asked, see pool_switched)
    pool_switched: bool = False  # True when different tokenizers forced per-document pooling
    tokenizers: str = "shared"  # shared | different
    nonfinite_rows: int = 0  # pairs with NaN/Inf seen by this run (dropped or zeroed per on_nonfinite)
    complete: bool = False  # every document of every text is done
    max_tokens: int | None = None  # the token cap of the run (None: none)
    seconds: dict = field(default_factory=dict)  # tokenize, forward, write (background), write_wait, total
    already_finished: bool = False  # nothing to do: found before loading any model

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def _model_key(info: dict) -> dict:
    return {k: info[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}


def _settings(collector: RowCollector, spec: CollectSpec, pool: str, tokenizers: str) -> dict:
    """The provenance entries that must match for a store to be resumed."""
    return {"upper_model": _model_key(collector.upper.info), "lower_model": _model_key(collector.lower.info),
            "layer": collector.layer, "target": spec.target,
            "lower_layer": collector.lower_layer if spec.target == "hidden" else None,
            "pool": pool, "max_length": spec.max_length, "dtype": collector.upper.info["dtype"],
            "tokenizers": tokenizers}


def _existing_store(out: str, *, overwrite: bool) -> PairsStore | None:
    """The store at ``out`` to resume, or ``None`` to create one; checked before any model loads
    (cheap, so a wrong ``-o`` fails at once): anything but a pairs store is refused even with
    ``overwrite``, and so are a pairs store not made by collect and a damaged one."""
    if check_output(out, PAIRS_FORMAT) is None or overwrite:
        return None
    store = PairsStore.open(out, "a")
    if store.provenance.get("settings") is None:
        raise DataError(f"{out} is a pairs store not made by collect: give a new -o (or --overwrite)")
    damaged = store.damaged_rows()
    if damaged:  # rows cannot be made again in place (they are not recorded per document)
        s0, s1 = damaged[0]
        raise CorruptStoreError(f"{out} is damaged ({len(damaged)} row chunk(s), first rows {s0}..{s1 - 1}): "
                                "collect cannot extend it; collect again into a new -o (or --overwrite)")
    return store


def _check_before_loading(store: PairsStore, upper, lower, sources, spec: CollectSpec) -> CollectReport | None:
    """What can be known of a resumed store before any model loads (the load takes a while): when the
    models are the ones it was collected with (same paths), the settings that need no model are
    checked (:class:`DataError` naming the first that differs); the report of a run with nothing to
    do (every document done, or ``max_tokens`` reached) is returned, else ``None``."""
    prov = store.provenance
    old = prov["settings"]
    paths = [str(Path(m).resolve()) if isinstance(m, (str, os.PathLike)) else None for m in (upper, lower or upper)]
    if paths != [prov.get("upper", {}).get("path"), prov.get("lower", {}).get("path")]:
        return None  # other (or moved, or loaded) models: the checks after loading decide

    def resolved(layer: int, info: dict) -> int:
        n = int(info.get("num_hidden_layers", 0)) + 1
        return layer % n if -n <= layer < n else layer  # out of range: the load says so

    now = {"layer": resolved(spec.layer, prov["upper"]), "target": spec.target, "max_length": spec.max_length,
           "lower_layer": resolved(spec.lower_layer, prov["lower"]) if spec.target == "hidden" else None}
    for k, v in now.items():
        if old.get(k) != v:
            raise DataError(f"{store.url} was collected with {k}={old.get(k)!r}, this run has {v!r}: "
                            "use the same settings to resume, or a new -o")
    if spec.pool != prov.get("pool_asked", old.get("pool")) or spec.dtype != old.get("dtype"):
        return None
    texts = prov.get("texts", {})
    done = all(s.sha256 in texts and count_done(texts[s.sha256]["done"]) == s.documents for s in sources)
    tokens = int(prov.get("tokens", 0))
    if not done and (spec.max_tokens is None or tokens < spec.max_tokens):
        return None
    skipped = sum(count_done(texts[s.sha256]["done"]) for s in sources if s.sha256 in texts)
    return CollectReport(out=str(store.url), rows_total=store.rows, tokens_total=tokens, documents_skipped=skipped,
                         documents_total=sum(s.documents for s in sources), pool=old.get("pool", spec.pool),
                         pool_switched=old.get("pool") != prov.get("pool_asked", old.get("pool")),
                         tokenizers=old.get("tokenizers", "shared"), complete=done, max_tokens=spec.max_tokens,
                         already_finished=True)


def _open_or_create(out: str, existing: PairsStore | None, collector: RowCollector, settings: dict,
                    provenance: dict, *, overwrite: bool, options: StoreOptions | None) -> PairsStore:
    if existing is not None:
        old = existing.provenance["settings"]
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise DataError(f"{out} was collected with {k}={old.get(k)!r}, this run has {settings[k]!r}: "
                            "use the same settings to resume, or a new -o")
        return existing
    d_in, d_out = collector.widths()
    return PairsStore.create(out, d_in=d_in, d_out=d_out, rows_per_chunk=rows_per_chunk(d_in + d_out),
                             options=options, provenance=provenance, overwrite=overwrite)


def rows_per_chunk(width: int) -> int:
    """Rows per chunk so that one row block of the store is at most ~64 MB (2048 rows at most, 64 at least).

    >>> rows_per_chunk(4096 + 4096), rows_per_chunk(4096 + 128256)
    (2048, 64)
    """
    rows = (64 << 20) // (4 * width)
    return max(64, min(2048, 1 << max(0, rows.bit_length() - 1)))


def collect(upper, lower, texts, out, *, spec: CollectSpec = CollectSpec(), overwrite: bool = False,
            options: StoreOptions | None = None, progress: Progress | None = None,
            notice: Notice | None = None) -> CollectReport:
    """Collect pairs from ``upper``/``lower`` (paths or :class:`LoadedModel`) on ``texts`` into ``out``.

    Resumes when ``out`` already holds a store collected with the same settings; see the module
    docstring for the layout of the work and what each setting means. ``progress(done, total)``
    counts upper-model tokens in the store (the total is ``spec.max_tokens``, or an estimate from the
    documents done so far; ``None`` until one is); ``notice(message)`` receives one-line messages for
    the user (that a model is being loaded, that the tokenizers differ and pairs are pooled per
    document).

    >>> collect("/nonexistent/model", None, ["t.txt"], "memory://x")
    Traceback (most recent call last):
    ...
    prismoe_store.errors.SourceError: no model at /nonexistent/model
    """
    t_start = time.perf_counter()
    check_model_paths(upper, lower)
    sources = scan_texts(texts)  # every line checked: a bad text fails here, before a store or a model
    out = str(out)
    existing = _existing_store(out, overwrite=overwrite)
    if existing is not None:
        finished = _check_before_loading(existing, upper, lower, sources, spec)
        if finished is not None:
            finished.seconds = {"total": round(time.perf_counter() - t_start, 4)}
            return finished
    upper, lower, same = load_models(upper, lower, device=spec.device, dtype=spec.dtype,
                                     need_head=spec.target == "logits", notice=notice)
    collector = spec.collector(upper, lower, same)

    shared = same or tokenizers_agree(upper, lower, sources)
    pool, switched = spec.pool, False
    if not shared and pool == "none":
        pool, switched = "last", True
        if notice:
            notice("upper and lower tokenizers differ: tokens cannot be aligned, so pairs are per document "
                   "(--pool last); pass --pool last|mean to choose")
    tokenizers = "shared" if shared else "different"
    settings = _settings(collector, spec, pool, tokenizers)
    store = _open_or_create(out, existing, collector, settings, {
        "kind": "collected", "settings": settings, "upper": upper.info, "lower": lower.info,
        "layer_asked": spec.layer, "pool_asked": spec.pool, "texts": {}, "tokens": 0, "tokens_lower": 0,
    }, overwrite=overwrite, options=options)

    prov = store.provenance
    texts_rec = dict(prov.get("texts", {}))
    for s in sources:
        texts_rec.setdefault(s.sha256, {"path": s.path, "size": s.size, "documents": s.documents,
                                        "format": "jsonl" if s.jsonl else "text", "done": [], "partial": None,
                                        "tokens": 0, "tokens_lower": 0, "rows": 0})
    tokens_total, tokens_lower_total = int(prov.get("tokens", 0)), int(prov.get("tokens_lower", 0))
    report = CollectReport(out=out, pool=pool, pool_switched=switched, tokenizers=tokenizers)
    report.documents_total = sum(s.documents for s in sources)
    report.documents_skipped = sum(count_done(texts_rec[s.sha256]["done"]) for s in sources)
    timer = {"tokenize": 0.0, "forward": 0.0, "write": 0.0, "write_wait": 0.0}
    docs_done = report.documents_skipped
    tokens_start = tokens_total
    if existing is not None and notice and (docs_done or tokens_total):
        notice(f"resuming: {docs_done} of {report.documents_total} documents collected ({tokens_total} tokens "
               "in the store)")
    if progress:
        progress(*token_progress(tokens_total, tokens_start, docs_done, report, spec.max_tokens))

    writer = PairsWriter(store, texts_rec, tokens_total, tokens_lower_total, timer)
    budget_hit = False
    try:
        for src in sources:
            entry = texts_rec[src.sha256]
            items = work_items(src, entry, upper, lower, shared=shared, pool=pool, max_length=spec.max_length,
                           timer=timer)
            while not budget_hit:
                if spec.max_tokens is not None and writer.tokens >= spec.max_tokens:
                    budget_hit = True
                    break
                batch: list[WorkItem] = []
                for it in items:
                    if spec.max_tokens is not None:
                        room = spec.max_tokens - writer.tokens - sum(b.new_tokens for b in batch)
                        if pool == "none" and it.new_tokens > room:  # stop at the cap, inside the window
                            it = cut_item(it, room)
                    batch.append(it)
                    if spec.max_tokens is not None and \
                            writer.tokens + sum(b.new_tokens for b in batch) >= spec.max_tokens:
                        budget_hit = True
                        break
                    if len(batch) >= spec.batch_size:
                        break
                if not batch:
                    break
                t0 = time.perf_counter()
                x, z = collector.rows(batch, pool)
                timer["forward"] += time.perf_counter() - t0
                x, z, bad = screen_nonfinite(x, z, spec.on_nonfinite, where=Path(src.path).name)
                report.nonfinite_rows += bad
                docs_done += writer.add(entry, batch, x, z)
                if progress:
                    progress(*token_progress(writer.tokens, tokens_start, docs_done, report, spec.max_tokens))
            if budget_hit:
                break
    finally:
        writer.close()  # on errors too: the finished batches are kept, with their bookkeeping
    tokens_total = writer.tokens
    report.rows_added = writer.rows_added
    report.tokens_added = writer.tokens_added
    report.documents_added = writer.documents_added

    report.rows_total = store.rows
    report.tokens_total = tokens_total
    report.complete = all(count_done(texts_rec[s.sha256]["done"]) == s.documents for s in sources)
    report.max_tokens = spec.max_tokens
    timer["total"] = time.perf_counter() - t_start
    report.seconds = {k: round(v, 4) for k, v in timer.items()}
    return report


def token_progress(tokens: int, tokens_start: int, docs_done: int, report: CollectReport,
                    max_tokens: int | None) -> tuple[int, int | None]:
    """``(tokens in the store, total)`` for the progress bar: the total is the ``max_tokens`` cap, or
    (without one) the tokens so far extrapolated over the documents left (``None`` before a
    document is finished).

    >>> r = CollectReport(out="x", documents_total=10, documents_skipped=0)
    >>> token_progress(300, 0, 2, r, None), token_progress(300, 0, 2, r, 1000), token_progress(0, 0, 0, r, None)
    ((300, 1500), (300, 1000), (0, None))
    """
    if max_tokens is not None:
        return tokens, max_tokens
    run_docs = docs_done - report.documents_skipped
    if run_docs <= 0:
        return tokens, None
    estimate = tokens_start + round((tokens - tokens_start) * (report.documents_total - report.documents_skipped)
                                    / run_docs)
    return tokens, max(tokens, estimate)


def format_collect(report: CollectReport) -> str:
    """The one line ``prismoe collect`` prints about a run.

    >>> print(format_collect(CollectReport(out="p.zarr", rows_added=5, rows_total=5, tokens_added=5, tokens_total=5,
    ...                                    documents_added=1, documents_total=1, complete=True)))
    5 pairs added from 5 tokens, 1 documents (0 already done); p.zarr holds 5 pairs, 5 tokens; pool=none; complete
    >>> print(format_collect(CollectReport(out="p.zarr", rows_total=8, tokens_total=8, max_tokens=8)).split("; ")[-1])
    stopped at --max-tokens 8 (a larger --max-tokens collects more)
    """
    capped = report.max_tokens is not None and report.tokens_total >= report.max_tokens
    state = ("complete" if report.complete else
             f"stopped at --max-tokens {report.max_tokens} (a larger --max-tokens collects more)" if capped else
             "partial (re-run to continue)")
    return (f"{report.rows_added} pairs added from {report.tokens_added} tokens, {report.documents_added} "
            f"documents ({report.documents_skipped} already done); {report.out} holds {report.rows_total} pairs, "
            f"{report.tokens_total} tokens; pool={report.pool}; {state}")

