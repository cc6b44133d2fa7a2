"""A ``torch.nn.Module`` head over the runtime, to stand in for a model's ``lm_head``.

:class:`PrisMoEHead` maps hidden states ``[..., hidden]`` to logits ``[..., vocab]`` through a
:class:`~prismoe_store.runtime.grouped.Runtime` (tiles loaded lazily through its cache) and hands the
result back in the caller's dtype and device. It holds no parameters: the tiles stay in the
adapter store until a gate selects them. :func:`replace_lm_head` swaps it into a transformers
causal LM (``model.set_output_embeddings``), checking the widths first. :class:`PrisMoEEmbedding`
stands in for a model's input embedding (``embed_tokens``) over a head adapter: token ids → rows,
gathered through the same band pool (a tied model's head and embedding share resident bands).
:func:`generate` swaps them into a model (a transformers folder, a ``.gguf``, or a folder holding
one) and generates greedily, optionally beside the original head.

>>> import numpy as np, torch
>>> from prismoe_store.stores.adapter import AdapterStore
>>> from prismoe_store.grid import plan_grid
>>> a = AdapterStore.create("memory://doc-head", grids=[plan_grid(4, 6, 4)], overwrite=True,
...                         attrs={"complete": True})
>>> head = PrisMoEHead.from_adapter(a)
>>> head(torch.ones(1, 2, 4, dtype=torch.bfloat16)).dtype
torch.bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from prismoe_store.errors import DataError, ModelError
from prismoe_store.runtime.bands import SelectRuntime
from prismoe_store.runtime.grouped import Runtime
from prismoe_store.runtime.open import open_runtime

if TYPE_CHECKING:  # transformers is an optional dependency (the `models` extra)
    from transformers import GenerationMixin


class PrisMoEHead(torch.nn.Module):
    """``lm_head`` replacement: ``hidden [..., d_in] → logits [..., d_out]`` through a runtime."""

    def __init__(self, runtime: Runtime | SelectRuntime):
        super().__init__()
        self.runtime = runtime  # the adapter runtime (its own device and tile cache)
        self.in_features = runtime.d_in  # hidden width, like nn.Linear
        self.out_features = runtime.d_out  # vocabulary size, like nn.Linear

    @classmethod
    def from_adapter(cls, adapter, **runtime_options) -> PrisMoEHead:
        """Open a runtime on ``adapter`` (path, URL or TileSource) with :func:`open_runtime` options."""
        return cls(open_runtime(adapter, **runtime_options))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.runtime(hidden)  # [..., d_out] float32 on the runtime's device
        return logits.to(device=hidden.device, dtype=hidden.dtype)

    def stats(self) -> dict:
        """The runtime's cache and timing statistics."""
        return self.runtime.stats()

    def extra_repr(self) -> str:
        c = self.runtime.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, device={c.device}, "
                f"quant={c.quant or 'fp32'}, schedule={c.schedule}, sparsity={self.runtime.sparsity}")


class PrisMoEEmbedding(torch.nn.Module):
    """``embed_tokens`` replacement: ``ids [...] → rows [..., d]`` of a head adapter's matrix.

    >>> import numpy as np, tempfile, os
    >>> from prismoe_store.head.build import HeadConfig, build_head
    >>> d = tempfile.mkdtemp(); w = np.arange(32, dtype=np.float32).reshape(8, 4)
    >>> np.save(os.path.join(d, "w.npy"), w)
    >>> _ = build_head(os.path.join(d, "w.npy"), os.path.join(d, "h.zarr"), config=HeadConfig(band_rows=2))
    >>> emb = PrisMoEEmbedding(open_runtime(os.path.join(d, "h.zarr")))
    >>> emb(torch.tensor([[5, 0]])).tolist() == [[w[5].tolist(), w[0].tolist()]]
    True
    """

    def __init__(self, runtime, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not hasattr(runtime, "embed"):
            raise DataError("an embedding needs a head adapter (`prismoe head`), not a fitted adapter")
        self.runtime = runtime  # a SelectRuntime (shared with the head for a tied model)
        self.num_embeddings = runtime.d_out  # vocabulary size, like nn.Embedding
        self.embedding_dim = runtime.d_in  # hidden width, like nn.Embedding
        self.out_dtype = dtype  # the dtype the model expects

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runtime.embed(ids).to(device=ids.device, dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, device={self.runtime.device}"


def replace_embedding(model, embedding: PrisMoEEmbedding) -> torch.nn.Module:
    """Put ``embedding`` in place of ``model``'s input embeddings (widths checked); returns the old one."""
    old = model.get_input_embeddings()
    shape = tuple(old.weight.shape) if hasattr(old, "weight") else None
    if shape != (embedding.num_embeddings, embedding.embedding_dim):
        raise DataError(f"the adapter holds {embedding.num_embeddings} × {embedding.embedding_dim} rows, "
                        f"but the model's input embedding is {shape}")
    embedding.out_dtype = old.weight.dtype
    model.set_input_embeddings(embedding)
    return old


def replace_lm_head(model, head: PrisMoEHead) -> torch.nn.Module:
    """Put ``head`` in place of ``model``'s output embeddings; returns the old head.

    The widths must match (hidden → vocab). Weight tying is switched off in the config so that a
    later ``tie_weights`` does not try to tie the new head to the input embeddings.
    """
    old = model.get_output_embeddings()
    if old is None:
        raise DataError(f"{type(model).__name__} has no output embeddings (lm_head) to replace")
    hidden = getattr(old, "in_features", None)
    vocab = getattr(old, "out_features", None)
    if (hidden, vocab) != (head.in_features, head.out_features):
        raise DataError(f"the adapter maps {head.in_features} → {head.out_features}, "
                        f"but the model's lm_head maps {hidden} → {vocab}")
    if getattr(old, "bias", None) is not None and getattr(head, "bias", None) is None:
        raise ModelError(f"the model's lm_head adds a bias ({vocab} values, e.g. Phi-2, GPT-J) that this adapter "
                         "head does not carry: its logits would be off by it, so the head is not replaced")
    for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    return old


@dataclass(frozen=True)
class Generation:
    """Greedy text from a model whose ``lm_head`` was replaced by an adapter."""

    text: str  # prompt + continuation with the PrisMoE head
    original: str | None  # prompt + continuation with the model's own head (when compared)
    new_tokens: int  # tokens generated with the PrisMoE head
    agreement: float | None  # share of generated positions where both heads chose the same token
    stats: dict  # the runtime's cache and timing statistics
    identical_prefix: int | None = None  # new tokens before the heads first chose differently (all: same text)

    @property
    def same(self) -> bool | None:
        """True when both heads produced the same text (``None`` without a comparison)."""
        return None if self.original is None else self.text == self.original


def compare_summary(generations: list[Generation]) -> dict:
    """How a compared run went over its prompts: ``prompts``, ``same_text`` (prompts whose text is
    identical), ``mean_agreement`` and ``mean_identical_prefix`` (means over the prompts).

    >>> g = Generation("a b", "a b", 2, 1.0, {}, 2), Generation("a c", "a b", 2, 0.5, {}, 1)
    >>> compare_summary(list(g))
    {'prompts': 2, 'same_text': 1, 'mean_agreement': 0.75, 'mean_identical_prefix': 1.5}
    """
    n = len(generations)
    agreements = [g.agreement for g in generations if g.agreement is not None]
    prefixes = [g.identical_prefix for g in generations if g.identical_prefix is not None]
    if n == 0 or any(g.original is None for g in generations) or len(agreements) < n or len(prefixes) < n:
        raise DataError("a comparison summary needs compared generations (generate with compare=True)")
    return {"prompts": n, "same_text": sum(bool(g.same) for g in generations),
            "mean_agreement": sum(agreements) / n, "mean_identical_prefix": sum(prefixes) / n}


def load_causal_lm(model):
    """``(model, tokenizer)`` of a causal LM — a transformers folder, a ``.gguf`` or a folder holding
    one — loaded offline in eval mode (see :func:`prismoe_store.data.models.load_model`)."""
    from prismoe_store.data.models import load_model

    lm = load_model(model)
    return lm.model, lm.tokenizer


def generate(adapter, model, prompt: str, **options) -> Generation:
    """Greedy generation for one prompt: :func:`generate_all` with ``[prompt]``."""
    return generate_all(adapter, model, [prompt], **options)[0]


def generate_all(adapter, model, prompts: list[str], *, max_new_tokens: int = 20, compare: bool = False,
                 embedding: bool = False, **runtime_options) -> list[Generation]:
    """Greedy generation from ``model`` with its ``lm_head`` replaced by ``adapter``, per prompt.

    ``model`` is a transformers causal-LM folder, a ``.gguf`` file, or a folder holding one (read
    offline, progress bars off). ``runtime_options`` go to
    :func:`~prismoe_store.runtime.open.open_runtime`; the model runs on the runtime's device. With
    ``compare`` the original head generates first, from the same prompts. With ``embedding`` the
    model's input embedding is replaced too (a head adapter of the tied matrix; the two share one
    band pool). Raises :class:`ModelError` for a model that cannot be loaded, :class:`DataError`
    when the widths do not match.
    """
    from prismoe_store.data.models import load_model

    head = PrisMoEHead.from_adapter(adapter, **runtime_options)  # a bad adapter fails before the model loads
    lm = load_model(model, device=runtime_options.get("device", "cpu"))
    net, tokenizer = lm.model, lm.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, return_tensors="pt").to(lm.device) for p in prompts]

    def greedy(inputs) -> torch.Tensor:
        with torch.no_grad():
            n = inputs["input_ids"].shape[1]
            generator = cast("GenerationMixin", net)  # a *ForCausalLM generates
            return generator.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad)[0, n:]  # [new]

    originals = [greedy(inputs) for inputs in encoded] if compare else [None] * len(prompts)
    replace_lm_head(net, head)
    if embedding:
        replace_embedding(net, PrisMoEEmbedding(head.runtime))
    results = []
    try:
        for inputs, original_ids in zip(encoded, originals, strict=True):
            head.runtime.reset_stats()
            ids = greedy(inputs)
            prompt_ids = inputs["input_ids"][0]
            agreement = prefix = None
            if original_ids is not None:
                pairs = list(zip(ids.tolist(), original_ids.tolist(), strict=False))
                n = max(len(ids), len(original_ids))
                agreement = sum(int(a == b) for a, b in pairs) / n if n else 1.0
                prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            results.append(Generation(text=_decode(tokenizer, prompt_ids, ids),
                                      original=(None if original_ids is None
                                                else _decode(tokenizer, prompt_ids, original_ids)),
                                      new_tokens=len(ids), agreement=agreement, stats=head.stats(),
                                      identical_prefix=prefix))
    finally:
        head.runtime.close()
    return results


def _decode(tokenizer, prompt_ids: torch.Tensor, new_ids: torch.Tensor) -> str:
    return tokenizer.decode(torch.cat([prompt_ids, new_ids]), skip_special_tokens=True)
