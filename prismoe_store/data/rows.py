"""The work of a collection and the rows it gives: windows of documents, run through the models.

:func:`work_items` turns the documents of a text that are not done yet into :class:`WorkItem` s —
windows of ``max_length`` tokens (``pool="none"``; a long document gives several, each run with a
fresh context) or whole documents truncated to ``max_length`` (pooled) — resuming inside the
window an earlier run stopped in. :class:`RowCollector` runs a batch of them through the upper and
lower models and returns float32 ``(x, z)`` rows, per token or pooled per document.

>>> it = WorkItem(doc=0, window=0, windows=1, upper=[1, 2, 3, 4], lower=[1, 2, 3, 4], next_id=None)
>>> cut = cut_item(it, 2)
>>> cut.upper, cut.next_id, cut.full
([1, 2], 3, False)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from prismoe_store.data.models import (
    LoadedModel,
    embed_tokens,
    forward_pass,
    hidden_index,
)
from prismoe_store.data.texts import TextSource, is_done, iter_documents

_TOKENIZE_DOCS = 256  # documents tokenized per tokenizer call


@dataclass
class WorkItem:
    """One sequence to run: a window of a document (pool none) or a whole document (pooled)."""

    doc: int  # document index in its text
    window: int  # window index within the document
    windows: int  # windows the document has
    upper: list  # upper-model token ids
    lower: list  # lower-model token ids (the same list when the tokenizers are shared)
    next_id: int | None  # for pool none: the id following the window, if any (embeddings target)
    skip: int = 0  # leading positions already collected by an earlier run (run for context, not stored)
    full: bool = True  # False: the window is cut short (the max_tokens cap); the rest is still to do

    @property
    def new_tokens(self) -> int:
        """Upper-model tokens this item adds to the store."""
        return len(self.upper) - self.skip


def cut_item(it: WorkItem, tokens: int) -> WorkItem:
    """``it`` shortened to its first ``tokens`` new tokens (a causal model's states of a prefix do not
    depend on what follows, so the rows are those of the whole window)."""
    end = it.skip + tokens
    nxt = it.upper[end] if end < len(it.upper) else it.next_id
    return replace(it, upper=it.upper[:end], lower=it.upper[:end] if it.lower is it.upper else it.lower[:end],
                   next_id=nxt, full=end >= len(it.upper) and it.full)


class RowCollector:
    """Turns work items into ``(x, z)`` rows for one configuration (models, layers, target, pool).

    ``target`` is what z is (see :mod:`prismoe_store.data.collect`); ``layer`` / ``lower_layer``
    index the upper / lower model's ``hidden_states`` (checked here); ``same_model``: one model
    gives x and z (one forward pass then serves both).
    """

    def __init__(self, upper: LoadedModel, lower: LoadedModel, *, target: str, layer: int = -1,
                 lower_layer: int = -1, same_model: bool = False):
        self.upper, self.lower, self.target, self.same = upper, lower, target, same_model
        self.layer = hidden_index(upper, layer, "layer")
        self.lower_layer = hidden_index(lower, lower_layer, "lower layer")

    def rows(self, items: list[WorkItem], pool: str) -> tuple[np.ndarray, np.ndarray]:
        """Run ``items`` through the models; returns float32 ``(x, z)`` rows (per token, or pooled)."""
        import torch

        target = self.target
        seqs = [it.upper for it in items]
        if target == "none":
            xs = forward_pass(self.upper, seqs, layers=(self.layer,), logits=False)[0][self.layer]
        elif self.same and all(it.upper is it.lower for it in items):  # one forward serves x and z
            layers = (self.layer, self.lower_layer) if target == "hidden" else (self.layer,)
            hid, logits = forward_pass(self.upper, seqs, layers=layers, logits=target == "logits")
            xs = hid[self.layer]
            zs = logits if target == "logits" else hid[self.lower_layer] if target == "hidden" else None
        else:
            xs, zs = forward_pass(self.upper, seqs, layers=(self.layer,), logits=False)[0][self.layer], None
            if target != "embeddings":
                hid, logits = forward_pass(self.lower, [it.lower for it in items], logits=target == "logits",
                                       layers=(self.lower_layer,) if target == "hidden" else ())
                zs = logits if target == "logits" else hid[self.lower_layer]
        if target == "none":  # hidden states only (a head adapter's gate needs no targets): z has no columns
            zs = [x.new_zeros(len(x), 0) for x in xs]
        if target == "embeddings":  # z_t is the embedding of token t+1: a position without one drops out
            nexts = [it.lower[1:] + ([it.next_id] if it.next_id is not None else []) for it in items]
            table = embed_tokens(self.lower, [t for n in nexts for t in n])
            zs = list(torch.split(table, [len(n) for n in nexts]))
            xs = [x[:len(it.upper) - (it.next_id is None)] for x, it in zip(xs, items)]
        assert zs is not None, f"every target sets z above ({target!r})"
        out_x, out_z = [], []
        for it, x, z in zip(items, xs, zs):
            if pool == "none" and it.skip:  # positions an earlier run stored: context only
                x, z = x[it.skip:], z[it.skip:]
            if pool != "none" and (len(x) == 0 or len(z) == 0):
                continue
            if pool == "last":
                x, z = x[-1:], z[-1:]
            elif pool == "mean":
                x, z = x.float().mean(0, keepdim=True), z.float().mean(0, keepdim=True)
            out_x.append(x.float())
            out_z.append(z.float())
        d_in, d_out = self.widths()
        if not out_x:
            return np.zeros((0, d_in), np.float32), np.zeros((0, d_out), np.float32)
        return torch.cat(out_x).cpu().numpy(), torch.cat(out_z).cpu().numpy()

    def widths(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of the rows: the upper hidden size; the lower vocabulary or hidden size (0: none)."""
        d_in = self.upper.info["hidden_size"]
        d_out = {"logits": self.lower.info["vocab_size"], "none": 0}.get(self.target, self.lower.info["hidden_size"])
        return d_in, d_out


def work_items(source: TextSource, entry: dict, upper: LoadedModel, lower: LoadedModel, *, shared: bool,
           pool: str, max_length: int, timer: dict) -> Iterator[WorkItem]:
    """The work left in one text: windows (pool none) or truncated documents (pooled), in order.

    ``entry`` is the text's record in the store's provenance (``done`` ranges and the ``partial``
    window an earlier run stopped in); tokenizing time is added to ``timer["tokenize"]``.
    """
    done, partial = entry["done"], entry.get("partial")  # partial: [doc, window(, tokens of it done)]
    docs = ((i, t) for i, t in iter_documents(source) if not is_done(done, i))
    while True:
        chunk = [d for _, d in zip(range(_TOKENIZE_DOCS), docs)]
        if not chunk:
            return
        t0 = time.perf_counter()
        texts = [t for _, t in chunk]
        up = upper.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lo = up if shared else lower.tokenizer(texts, add_special_tokens=True)["input_ids"]
        timer["tokenize"] += time.perf_counter() - t0
        for (doc, _), u, lw in zip(chunk, up, lo):
            if pool != "none":
                u_cut = u[:max_length]
                yield WorkItem(doc, 0, 1, u_cut, u_cut if shared else lw[:max_length], None)
                continue
            n_win = max(1, -(-len(u) // max_length))
            first = partial[1] if partial and partial[0] == doc else 0
            offset = partial[2] if partial and partial[0] == doc and len(partial) > 2 else 0
            for w in range(first, n_win):
                seg = u[w * max_length:(w + 1) * max_length]
                nxt = u[(w + 1) * max_length] if (w + 1) * max_length < len(u) else None
                yield WorkItem(doc, w, n_win, seg, seg, nxt, skip=offset if w == first else 0)
