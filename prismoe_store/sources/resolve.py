"""Which tensor of a checkpoint a requested name stands for — or a refusal that says what is there.

The names ``lm_head`` and ``embedding`` are aliases for the usual tensor names of Llama, Qwen,
GPT-2, BERT, GPT-NeoX and GGUF checkpoints. Rules, in order (the first that answers wins):

1. ``exact``: a tensor has the name asked for;
2. ``only tensor``: the source holds a single tensor (``.npy``, a bare ``torch.save``d tensor)
   not named as the other alias (a lone ``model.embed_tokens.weight`` is not a head);
3. ``alias``: the first of :data:`ALIASES` present;
4. ``suffix``: the only tensor whose name ends like an alias (``foo.my_lm_head.weight``);
5. ``tied`` (``lm_head`` only): the input embedding, **only** when the checkpoint says or shows
   that the head is tied to it (:class:`~prismoe_store.sources.records.CheckpointFacts`).

Anything else is refused with what was found: a head stored packed (``lm_head.qweight``), a head
that the checkpoint says is untied but is absent, or a missing head with nothing saying it is tied.

>>> from prismoe_store.sources.records import TensorInfo, CheckpointFacts
>>> infos = {n: TensorInfo(n, (8, 4), "F32") for n in ["model.embed_tokens.weight", "model.norm.weight"]}
>>> resolve(infos, "lm_head", CheckpointFacts(tied=True, tied_why="config.json: tie_word_embeddings=true")).tensor
'model.embed_tokens.weight'
"""

from __future__ import annotations

from collections.abc import Mapping

from prismoe_store.errors import QuantizedTensorError, TensorNotFoundError
from prismoe_store.sources.records import NO_FACTS, CheckpointFacts, Resolution, TensorInfo

ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head": (
        "lm_head.weight", "output.weight", "model.lm_head.weight", "language_model.lm_head.weight",
        "embed_out.weight", "cls.predictions.decoder.weight",
    ),
    "embedding": (
        "model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight", "wte.weight",
        "bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", "token_embd.weight",
        "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "model.decoder.embed_tokens.weight",
        "language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
        "tok_embeddings.weight", "shared.weight",
    ),
}
SUFFIXES: dict[str, tuple[str, ...]] = {
    "lm_head": ("lm_head.weight",),
    "embedding": ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "token_embd.weight"),
}
# Biases added to the logits of a head, tried in order when ``lm_head`` resolves (to a head or to
# the tied embedding); a resolved ``<x>.weight`` also has its own ``<x>.bias``.
HEAD_BIASES = ("lm_head.bias", "output.bias", "model.lm_head.bias", "language_model.lm_head.bias",
               "embed_out.bias", "cls.predictions.decoder.bias", "cls.predictions.bias", "final_logits_bias")
_HEAD_MODULES = tuple(sorted({a.removesuffix(".weight") for a in ALIASES["lm_head"]}))


def resolve(infos: Mapping[str, TensorInfo], wanted: str, facts: CheckpointFacts = NO_FACTS,
            where: str = "the checkpoint") -> Resolution:
    """The tensor ``wanted`` stands for in ``infos`` (a source's tensors), with the rule and reason.

    Raises :class:`TensorNotFoundError` (listing what is there and what would make it resolve) or
    :class:`QuantizedTensorError` (the head is stored packed).
    """
    if wanted in infos:
        return Resolution(wanted, wanted, "exact", "the name asked for")
    if wanted not in ALIASES:
        raise TensorNotFoundError(f"no tensor {wanted!r} in {where}; it has {listing(infos, near=wanted)}")
    if len(infos) == 1 and not _named_otherwise(next(iter(infos)), wanted):
        (only,) = infos
        return Resolution(wanted, only, "only tensor", f"{where} holds this one tensor")
    for candidate in ALIASES[wanted]:
        if candidate in infos:
            return Resolution(wanted, candidate, "alias", f"a usual name of the {_what(wanted)}")
    hits = [n for n in infos if n.endswith(SUFFIXES[wanted])]
    if len(hits) == 1:
        return Resolution(wanted, hits[0], "suffix", f"the only tensor named like the {_what(wanted)}")
    if wanted != "lm_head":
        raise TensorNotFoundError(f"no {_what(wanted)} in {where} (tried {', '.join(ALIASES[wanted][:4])}, ...); "
                                  f"it has {listing(infos)}")
    _refuse_packed_head(infos, where)
    try:
        embedding = resolve(infos, "embedding", facts, where).tensor
    except TensorNotFoundError:
        raise TensorNotFoundError(f"no head and no input embedding in {where}; it has {listing(infos)}") from None
    if facts.tied:
        return Resolution(wanted, embedding, "tied", f"no head tensor; {facts.tied_why}")
    if facts.tied is False:
        raise TensorNotFoundError(
            f"no head tensor in {where}, and the head is not the embedding {embedding!r} ({facts.tied_why}): "
            "the checkpoint lacks its head (a missing shard or split part?)")
    raise TensorNotFoundError(
        f"no head tensor in {where}; it has the embedding {embedding!r}, but nothing says the head is tied to it "
        f"(no config.json with tie_word_embeddings beside it): to use it as the head anyway, name it "
        f"(--tensor lm_head={embedding})")


def head_bias(infos: Mapping[str, TensorInfo], resolution: Resolution) -> str | None:
    """The 1-D bias added to the logits of the head ``resolution`` chose, or ``None``.

    A tensor ``<x>.weight`` asked for by name has the bias ``<x>.bias``; ``lm_head`` also looks for
    the usual head biases (:data:`HEAD_BIASES`; a tied head's bias lives beside the head module).
    """
    rows = infos[resolution.tensor].shape[0]
    names = [resolution.tensor.removesuffix(".weight") + ".bias"] if resolution.tensor.endswith(".weight") else []
    if resolution.asked == "lm_head" and resolution.rule != "only tensor":
        names += HEAD_BIASES
    for name in names:
        info = infos.get(name)
        if info is not None and len(info.shape) in (1, 2) and info.shape[-1] == rows and _size(info) == rows:
            return name
    return None


PACKED_MARKERS = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_shape", "weight_scale",
                  "weight_scale_inv", "weight_zero_point", "weight_global_scale", "SCB", "weight_format", "absmax",
                  "quant_map", "nested_absmax", "weight_blocks",
                  "weight_scales")  # GPTQ/AWQ, compressed-tensors, bnb, MXFP4


def _refuse_packed_head(infos: Mapping[str, TensorInfo], where: str) -> None:
    """A head module with tensors but no ``.weight``: packed (refused as such) or unknown (listed)."""
    parts = sorted(n for n in infos if n.startswith(tuple(m + "." for m in _HEAD_MODULES)) and not n.endswith(".bias"))
    if any(p.rsplit(".", 1)[-1] in PACKED_MARKERS or ".weight." in p for p in parts):
        raise QuantizedTensorError(
            f"the head in {where} is stored packed or quantized ({', '.join(parts[:6])}), not as a float matrix: "
            "this tool cannot dequantize that format; extract from an unquantized checkpoint")
    if parts:
        raise TensorNotFoundError(f"the head module in {where} holds {', '.join(parts[:6])} but no plain weight: "
                                  "name the tensor to extract with --tensor")


def _named_otherwise(name: str, wanted: str) -> bool:
    """True when ``name`` is the usual name of another alias (a lone embedding is not a head)."""
    return any(name in ALIASES[a] or name.endswith(SUFFIXES[a]) for a in ALIASES if a != wanted)


def _what(alias: str) -> str:
    return {"lm_head": "output head (lm_head)", "embedding": "input embedding"}[alias]


def _size(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n


def listing(infos: Mapping[str, TensorInfo], limit: int = 8, near: str | None = None) -> str:
    """``N tensors: a, b, ...``: the names closest to ``near`` first (then the usual head and
    embedding names, then other matrices), at most ``limit`` names.

    >>> from prismoe_store.sources.records import TensorInfo
    >>> infos = {n: TensorInfo(n, (4, 4), "F32") for n in ["a.weight", "model.norm.weight", "lm_head.weight"]}
    >>> listing(infos, limit=2, near="lm_haed.weight")
    '3 tensors: lm_head.weight, a.weight and 1 more'
    """
    import difflib

    names = sorted(infos, key=lambda n: (not infos[n].is_matrix, n))
    close = difflib.get_close_matches(near, names, n=limit, cutoff=0.5) if near else []
    usual = [n for a in ALIASES.values() for n in a if n in infos]
    ordered = list(dict.fromkeys([*close, *usual, *names]))
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"{len(names)} tensors: " + ", ".join(ordered[:limit]) + more
