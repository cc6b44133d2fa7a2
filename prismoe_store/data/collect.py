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

>>> CollectSpec(target="embeddings", pool="mean").pool
'mean'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from prismoe_store.errors import CorruptStoreError, DataError, ModelError, SourceError
from prismoe_store.stores.pairs import NONFINITE_CHOICES, PairsStore, screen_nonfinite
from prismoe_store.stores.formats import StoreOptions, store_exists

TARGETS = ("logits", "embeddings", "hidden", "none")
POOLS = ("none", "last", "mean")
DTYPES = ("float32", "float16", "bfloat16")
NONFINITE = NONFINITE_CHOICES  # the pairs store's NaN/Inf policies: error, drop, zero
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "*.pt", "*.pth")
_TOKENIZE_DOCS = 256  # documents tokenized per tokenizer call
_PROBE_DOCS = 64  # documents per text used to decide whether two tokenizers agree

Progress = Callable[[int, int], None]
Notice = Callable[[str], None]


# -- settings ---------------------------------------------------------------------------------


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
    seconds: dict = field(default_factory=dict)  # tokenize, forward, write (background), write_wait, total

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return dict(self.__dict__)


# -- models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM and its tokenizer, loaded offline by :func:`load_model`."""

    model: object  # a transformers ``PreTrainedModel`` (``*ForCausalLM``), in eval mode on its device
    tokenizer: object  # its tokenizer (fast)
    info: dict  # provenance: path, format (folder|gguf), model_type, widths, files
    device: str  # where the model runs
    missing_head: tuple[str, ...] = ()  # head parameters the checkpoint lacked (randomly initialised)

    @property
    def num_layers(self) -> int:
        """Decoder blocks (``hidden_states`` has one entry more)."""
        return int(self.info["num_hidden_layers"])


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked but CUDA is not available here (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ModelError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _locate(spec: str) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` for a model folder or a ``.gguf`` file; clear errors."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"no model at {spec}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf: give a model folder or a .gguf file")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise ModelError(f"{spec} has no config.json (not a Hugging Face model folder)"
                         + (f"; it holds {len(ggufs)} .gguf files: name one" if ggufs else ""))
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise ModelError(f"{spec} has no weights (model*.safetensors, pytorch_model*.bin, "
                         "model.safetensors.index.json)")
    return path, None


def _dtype_kwarg(dtype) -> dict:
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_gguf_without_accelerate(folder: Path, name: str, dtype):
    """transformers' GGUF support without ``accelerate``: its GGUF config, then its GGUF tensor
    reader (``load_gguf_checkpoint``: names mapped, q/k un-permuted, quantized blocks dequantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    with contextlib.redirect_stderr(io.StringIO()):  # its own tqdm bar ignores transformers' switch
        tensors = load_gguf_checkpoint(str(folder / name), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied and "rotary_emb" not in k]
    if missing:
        raise ModelError(f"{folder / name}: GGUF lacks tensors for {', '.join(missing[:4])}"
                         + (" ..." if len(missing) > 4 else ""))
    if tied:
        model.tie_weights()
    return model.to(dtype)


def load_model(spec: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder or a ``.gguf`` file, offline.

    A folder is a Hugging Face model folder (``config.json``, weights, tokenizer files); a ``.gguf``
    file (or a folder holding exactly one) goes through transformers' GGUF support. Nothing is
    fetched from a hub (``local_files_only=True``).

    >>> load_model("/nonexistent/model")
    Traceback (most recent call last):
    ...
    prismoe_store.errors.SourceError: no model at /nonexistent/model
    """
    folder, gguf_name = _locate(str(spec))
    device = _resolve_device(device)
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - transformers is an optional extra
        raise ModelError(f"loading models needs transformers (pip install prismoe-store[models]): {e}") from None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    tdtype = _torch_dtype(dtype)
    where = folder / gguf_name if gguf_name else folder
    stack = contextlib.ExitStack()
    try:
        kw = {"gguf_file": gguf_name} if gguf_name else {}
        stack.enter_context(_quiet_gguf_bar())
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        missing: list[str] = []
        if gguf_name and not transformers.utils.is_accelerate_available():
            model = _load_gguf_without_accelerate(folder, gguf_name, tdtype)  # refuses missing tensors itself
        else:
            model, loading = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kw,
                                                                  **_dtype_kwarg(tdtype), output_loading_info=True)
            missing = list(loading.get("missing_keys") or [])
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError, AttributeError) as e:
        raise ModelError(f"cannot load {where}: {_first_line(e)}") from None
    finally:
        stack.close()
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().to(device)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    files = sorted(p for p in folder.iterdir() if p.is_file()) if not gguf_name else [folder / gguf_name]
    info = {
        "path": str(where.resolve()),
        "format": "gguf" if gguf_name else "folder",
        "model_type": getattr(cfg, "model_type", None),
        "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        "hidden_size": int(model.get_input_embeddings().weight.shape[1]),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "tokenizer_size": len(tokenizer),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "files": [{"name": p.name, "size": p.stat().st_size} for p in files],
    }
    return LoadedModel(model, tokenizer, info, device, _head_parameters(model, missing))


def _head_parameters(model, missing: list[str]) -> tuple[str, ...]:
    """The missing parameters outside the base model (the LM head transformers had to make up)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return tuple(sorted(k for k in missing if not (prefix and k.startswith(prefix + ".")) and "rotary_emb" not in k))


def require_lm_head(lm: LoadedModel) -> None:
    """Refuse a model whose LM head did not come from its checkpoint (an encoder such as BERT or
    MiniLM saved without one, loaded as a causal LM: its logits would come from random weights)."""
    if lm.missing_head:
        arch = ", ".join(lm.info.get("architectures") or []) or lm.info.get("model_type") or "?"
        names = ", ".join(lm.missing_head[:4]) + (" ..." if len(lm.missing_head) > 4 else "")
        raise ModelError(
            f"{lm.info['path']} ({arch}) has no language-model head in its checkpoint ({names} would be "
            "randomly initialised), so it has no logits to collect: use a causal LM, or --target hidden / embeddings")


# -- texts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """A text file of documents, fingerprinted; see :func:`scan_text`."""

    path: str  # absolute path
    sha256: str  # content hash (identifies the text across runs and paths)
    size: int  # bytes
    documents: int  # number of documents
    jsonl: bool  # True: one JSON object with "text" per line; False: one document per non-blank line


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def scan_text(path: str | os.PathLike) -> TextSource:
    """Hash a text file and count its documents (one streaming pass); clear errors when unusable.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.txt")
    >>> _ = open(p, "w").write("one doc\\n\\nanother doc\\n")
    >>> scan_text(p).documents
    2
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SourceError(f"no text file at {path}")
    digest, count = hashlib.sha256(), 0
    with open(p, "rb") as fh:
        for line in fh:
            digest.update(line)
            if line.strip():
                count += 1
    if count == 0:
        raise DataError(f"{path} has no documents (the file is empty or blank)")
    return TextSource(str(p.resolve()), digest.hexdigest(), p.stat().st_size, count, _is_jsonl(p))


def iter_documents(source: TextSource, *, start: int = 0) -> Iterator[tuple[int, str]]:
    """Yield ``(index, text)`` for the documents of ``source`` from index ``start`` on.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.jsonl")
    >>> _ = open(p, "w").write('{"text": "a"}\\n{"text": "b"}\\n')
    >>> list(iter_documents(scan_text(p), start=1))
    [(1, 'b')]
    """
    index = 0
    with open(source.path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            if index >= start:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{source.path}:{lineno}: not UTF-8 text") from None
                if source.jsonl:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{source.path}:{lineno}: not a JSON object ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise DataError(f"{source.path}:{lineno}: JSONL line has no string \"text\" field")
                    text = obj["text"]
                else:
                    text = line.rstrip("\r\n")
                yield index, text
            index += 1


# -- done-ranges bookkeeping ------------------------------------------------------------------


def _add_range(ranges: list, start: int, stop: int) -> list:
    """Merge ``[start, stop)`` into sorted disjoint ``ranges``.

    >>> _add_range([[0, 3], [5, 6]], 3, 5)
    [[0, 6]]
    """
    out = []
    for a, b in sorted([*map(list, ranges), [start, stop]]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _count_done(ranges: list) -> int:
    return sum(b - a for a, b in ranges)


def _is_done(ranges: list, index: int) -> bool:
    return any(a <= index < b for a, b in ranges)


# -- running the models -----------------------------------------------------------------------


def _hidden_index(lm: LoadedModel, layer: int, what: str) -> int:
    n = lm.num_layers + 1
    if not -n <= layer < n:
        raise DataError(f"{what} {layer} out of range: the model has hidden states 0..{n - 1} (or -{n}..-1)")
    return layer % n


def _forward(lm: LoadedModel, seqs: list[list[int]], *, layers: tuple[int, ...], logits: bool):
    """One padded forward pass of ``seqs``; returns ``({layer: [T_i, H] per seq}, [T_i, V] per seq or None)``
    as slices on the model's device (right padding: causal attention keeps real positions exact)."""
    import torch

    lengths = [len(s) for s in seqs]
    width = max(lengths)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    last = lm.num_layers
    need_all = any(layer != last for layer in layers)
    with torch.inference_mode():
        if logits:
            out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=bool(layers))
            states = {layer: out.hidden_states[layer] for layer in layers}
        else:
            out = lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False,
                                      output_hidden_states=need_all)
            states = {layer: out.last_hidden_state if layer == last else out.hidden_states[layer]
                      for layer in layers}
    hidden = {layer: [h[i, :n] for i, n in enumerate(lengths)] for layer, h in states.items()}
    return hidden, ([out.logits[i, :n] for i, n in enumerate(lengths)] if logits else None)


def _embed(lm: LoadedModel, ids: list[int]):
    import torch

    with torch.inference_mode():
        return lm.model.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.long, device=lm.device))


@dataclass
class _Item:
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


def _cut(it: _Item, tokens: int) -> _Item:
    """``it`` shortened to its first ``tokens`` new tokens (a causal model's states of a prefix do not
    depend on what follows, so the rows are those of the whole window)."""
    end = it.skip + tokens
    nxt = it.upper[end] if end < len(it.upper) else it.next_id
    return replace(it, upper=it.upper[:end], lower=it.upper[:end] if it.lower is it.upper else it.lower[:end],
                   next_id=nxt, full=end >= len(it.upper) and it.full)


class _Collector:
    """Turns items into ``(x, z)`` rows for one configuration (models, layers, target, pool)."""

    def __init__(self, upper: LoadedModel, lower: LoadedModel, spec: CollectSpec, same_model: bool):
        self.upper, self.lower, self.spec, self.same = upper, lower, spec, same_model
        self.layer = _hidden_index(upper, spec.layer, "layer")
        self.lower_layer = _hidden_index(lower, spec.lower_layer, "lower layer")

    def rows(self, items: list[_Item], pool: str) -> tuple[np.ndarray, np.ndarray]:
        """Run ``items`` through the models; returns float32 ``(x, z)`` rows (per token, or pooled)."""
        import torch

        target = self.spec.target
        seqs = [it.upper for it in items]
        if target == "none":
            xs = _forward(self.upper, seqs, layers=(self.layer,), logits=False)[0][self.layer]
        elif self.same and all(it.upper is it.lower for it in items):  # one forward serves x and z
            layers = (self.layer, self.lower_layer) if target == "hidden" else (self.layer,)
            hid, logits = _forward(self.upper, seqs, layers=layers, logits=target == "logits")
            xs = hid[self.layer]
            zs = logits if target == "logits" else hid[self.lower_layer] if target == "hidden" else None
        else:
            xs, zs = _forward(self.upper, seqs, layers=(self.layer,), logits=False)[0][self.layer], None
            if target != "embeddings":
                hid, logits = _forward(self.lower, [it.lower for it in items], logits=target == "logits",
                                       layers=(self.lower_layer,) if target == "hidden" else ())
                zs = logits if target == "logits" else hid[self.lower_layer]
        if target == "none":  # hidden states only (a head adapter's gate needs no targets): z has no columns
            zs = [x.new_zeros(len(x), 0) for x in xs]
        if target == "embeddings":  # z_t is the embedding of token t+1: a position without one drops out
            nexts = [it.lower[1:] + ([it.next_id] if it.next_id is not None else []) for it in items]
            table = _embed(self.lower, [t for n in nexts for t in n])
            zs = list(torch.split(table, [len(n) for n in nexts]))
            xs = [x[:len(it.upper) - (it.next_id is None)] for x, it in zip(xs, items)]
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
        d_in = self.upper.info["hidden_size"]
        d_out = {"logits": self.lower.info["vocab_size"], "none": 0}.get(self.spec.target, self.lower.info["hidden_size"])
        return d_in, d_out


# -- the collection ---------------------------------------------------------------------------


def _tokenizers_agree(upper: LoadedModel, lower: LoadedModel, sources: list[TextSource]) -> bool:
    """True when both tokenizers encode a probe of the texts identically (then ids are shared)."""
    if upper.tokenizer is lower.tokenizer:
        return True
    probe = ["Hello, World! 123 x-y_z  \u00e9\u00df\u4e2d"]
    for src in sources:
        for i, text in iter_documents(src):
            if i >= _PROBE_DOCS:
                break
            probe.append(text)
    a = upper.tokenizer(probe, add_special_tokens=True)["input_ids"]
    b = lower.tokenizer(probe, add_special_tokens=True)["input_ids"]
    return a == b and max(max(s, default=0) for s in a) < lower.info["vocab_size"]


def _model_key(info: dict) -> dict:
    return {k: info[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}


def _settings(collector: _Collector, spec: CollectSpec, pool: str, tokenizers: str) -> dict:
    """The provenance entries that must match for a store to be resumed."""
    return {"upper_model": _model_key(collector.upper.info), "lower_model": _model_key(collector.lower.info),
            "layer": collector.layer, "target": spec.target,
            "lower_layer": collector.lower_layer if spec.target == "hidden" else None,
            "pool": pool, "max_length": spec.max_length, "dtype": collector.upper.info["dtype"],
            "tokenizers": tokenizers}


def _open_or_create(out: str, collector: _Collector, settings: dict, provenance: dict, *,
                    overwrite: bool, options: StoreOptions | None) -> PairsStore:
    if not overwrite and store_exists(out):
        store = PairsStore.open(out, "a")
        old = store.provenance.get("settings")
        if old is None:
            raise DataError(f"{out} is a pairs store not made by collect: give a new -o (or --overwrite)")
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise DataError(f"{out} was collected with {k}={old.get(k)!r}, this run has {settings[k]!r}: "
                            "use the same settings to resume, or a new -o")
        damaged = store.damaged_rows()
        if damaged:  # rows cannot be made again in place (they are not recorded per document)
            s0, s1 = damaged[0]
            raise CorruptStoreError(f"{out} is damaged ({len(damaged)} row chunk(s), first rows {s0}..{s1 - 1}): "
                                    "collect cannot extend it; collect again into a new -o (or --overwrite)")
        return store
    d_in, d_out = collector.widths()
    return PairsStore.create(out, d_in=d_in, d_out=d_out, rows_per_chunk=_rows_per_chunk(d_in + d_out),
                             options=options, provenance=provenance, overwrite=overwrite)


def _rows_per_chunk(width: int) -> int:
    """Rows per chunk so that one row block of the store is at most ~64 MB (2048 rows at most, 64 at least).

    >>> _rows_per_chunk(4096 + 4096), _rows_per_chunk(4096 + 128256)
    (2048, 64)
    """
    rows = (64 << 20) // (4 * width)
    return max(64, min(2048, 1 << max(0, rows.bit_length() - 1)))


def _items(source: TextSource, entry: dict, upper: LoadedModel, lower: LoadedModel, *, shared: bool,
           pool: str, max_length: int, timer: dict) -> Iterator[_Item]:
    """The work left in one text: windows (pool none) or truncated documents (pooled), in order."""
    done, partial = entry["done"], entry.get("partial")  # partial: [doc, window(, tokens of it done)]
    docs = ((i, t) for i, t in iter_documents(source) if not _is_done(done, i))
    while True:
        chunk = [d for _, d in zip(range(_TOKENIZE_DOCS), docs)]
        if not chunk:
            return
        t0 = time.perf_counter()
        texts = [t for _, t in chunk]
        up = upper.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lo = up if shared else lower.tokenizer(texts, add_special_tokens=True)["input_ids"]
        timer["tokenize"] += time.perf_counter() - t0
        for (doc, _), u, l in zip(chunk, up, lo):
            if pool != "none":
                u_cut = u[:max_length]
                yield _Item(doc, 0, 1, u_cut, u_cut if shared else l[:max_length], None)
                continue
            n_win = max(1, -(-len(u) // max_length))
            first = partial[1] if partial and partial[0] == doc else 0
            offset = partial[2] if partial and partial[0] == doc and len(partial) > 2 else 0
            for w in range(first, n_win):
                seg = u[w * max_length:(w + 1) * max_length]
                nxt = u[(w + 1) * max_length] if (w + 1) * max_length < len(u) else None
                yield _Item(doc, w, n_win, seg, seg, nxt, skip=offset if w == first else 0)


def _sources(texts) -> list[TextSource]:
    """Scan the text files (a text given twice, or under two names, counts once)."""
    texts = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    if not texts:
        raise DataError("no text files given")
    return list({s.sha256: s for s in map(scan_text, texts)}.values())


def _loading_note(model) -> str:
    """What loading ``model`` involves, for the notice before it."""
    path = Path(str(model))
    if path.suffix.lower() == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        return "transformers dequantizes the GGUF into float tensors first: SmolLM2-135M's 98 MB took 40 s on 2 cores"
    return "transformers reads the weights; large models take a while"


@contextlib.contextmanager
def _quiet_gguf_bar():
    """Silence the one bar transformers' GGUF reader draws with plain tqdm (not behind its
    ``disable_progress_bar`` switch), like the others while a model loads."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _check_models(*models) -> None:
    """Fail fast (before the slow loading) on model paths that cannot work."""
    for m in models:
        if isinstance(m, (str, os.PathLike)):
            _locate(str(m))


def _models(upper, lower, spec: CollectSpec, notice: Notice | None = None):
    """``(upper, lower, same)`` as :class:`LoadedModel` s (``lower=None``: the upper model)."""
    paths = [m for m in (upper, lower) if isinstance(m, (str, os.PathLike))]
    same = lower is None or lower is upper or (len(paths) == 2 and Path(lower).resolve() == Path(upper).resolve())
    say = notice or (lambda message: None)
    if not isinstance(upper, LoadedModel):
        say(f"loading {'the model' if same else 'the upper model'} {upper} ({_loading_note(upper)})")
        upper = load_model(upper, device=spec.device, dtype=spec.dtype)
    if same:
        lower = upper
    elif not isinstance(lower, LoadedModel):
        say(f"loading the lower model {lower} ({_loading_note(lower)})")
        lower = load_model(lower, device=spec.device, dtype=spec.dtype)
    if spec.target == "logits":
        require_lm_head(lower)
    return upper, lower, same


class _Writer:
    """Buffers finished batches and appends them, with their bookkeeping, in one commit per about
    ``rows_per_chunk`` rows (fewer partial-chunk rewrites than a commit per batch).

    Appends run on one background thread, so the store write of one buffer overlaps the forward
    passes of the next (at most one append in flight; its error surfaces at the next flush or at
    :meth:`close`). An interrupted run loses at most the uncommitted rows, which the committed
    bookkeeping does not claim.
    """

    def __init__(self, store: PairsStore, texts: dict, tokens: int, tokens_lower: int, report: CollectReport,
                 timer: dict):
        self.store, self.texts, self.report, self.timer = store, texts, report, timer
        self.tokens, self.tokens_lower = tokens, tokens_lower  # totals including the buffer
        self.xs: list[np.ndarray] = []
        self.zs: list[np.ndarray] = []
        self.buffered = 0  # rows in the buffer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prismoe-collect-writer")
        self._pending: Future | None = None

    def add(self, entry: dict, batch: list[_Item], x: np.ndarray, z: np.ndarray) -> int:
        """Buffer a batch's rows and record what it finished; returns the documents it finished."""
        n_up = sum(b.new_tokens for b in batch)
        n_lo = sum(len(b.lower) - b.skip if b.lower is b.upper else len(b.lower) for b in batch)
        finished = sorted({b.doc for b in batch if b.window == b.windows - 1 and b.full})
        for d in finished:
            entry["done"] = _add_range(entry["done"], d, d + 1)
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
        self.report.tokens_added += n_up
        self.report.documents_added += len(finished)
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
        self.report.rows_added += len(x)
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
    _check_models(upper, lower)
    sources = _sources(texts)
    upper, lower, same = _models(upper, lower, spec, notice)
    collector = _Collector(upper, lower, spec, same)

    shared = same or _tokenizers_agree(upper, lower, sources)
    pool, switched = spec.pool, False
    if not shared and pool == "none":
        pool, switched = "last", True
        if notice:
            notice("upper and lower tokenizers differ: tokens cannot be aligned, so pairs are per document "
                   "(--pool last); pass --pool last|mean to choose")
    tokenizers = "shared" if shared else "different"
    settings = _settings(collector, spec, pool, tokenizers)
    out = str(out)
    store = _open_or_create(out, collector, settings, {
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
    report.documents_skipped = sum(_count_done(texts_rec[s.sha256]["done"]) for s in sources)
    timer = {"tokenize": 0.0, "forward": 0.0, "write": 0.0, "write_wait": 0.0}
    docs_done = report.documents_skipped
    tokens_start = tokens_total
    if progress:
        progress(*_token_progress(tokens_total, tokens_start, docs_done, report, spec.max_tokens))

    writer = _Writer(store, texts_rec, tokens_total, tokens_lower_total, report, timer)
    budget_hit = False
    try:
        for src in sources:
            entry = texts_rec[src.sha256]
            items = _items(src, entry, upper, lower, shared=shared, pool=pool, max_length=spec.max_length,
                           timer=timer)
            while not budget_hit:
                if spec.max_tokens is not None and writer.tokens >= spec.max_tokens:
                    budget_hit = True
                    break
                batch: list[_Item] = []
                for it in items:
                    if spec.max_tokens is not None:
                        room = spec.max_tokens - writer.tokens - sum(b.new_tokens for b in batch)
                        if pool == "none" and it.new_tokens > room:  # stop at the cap, inside the window
                            it = _cut(it, room)
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
                    progress(*_token_progress(writer.tokens, tokens_start, docs_done, report, spec.max_tokens))
            if budget_hit:
                break
    finally:
        writer.close()  # on errors too: the finished batches are kept, with their bookkeeping
    tokens_total = writer.tokens

    report.rows_total = store.rows
    report.tokens_total = tokens_total
    report.complete = all(_count_done(texts_rec[s.sha256]["done"]) == s.documents for s in sources)
    timer["total"] = time.perf_counter() - t_start
    report.seconds = {k: round(v, 4) for k, v in timer.items()}
    return report


def _token_progress(tokens: int, tokens_start: int, docs_done: int, report: CollectReport,
                    max_tokens: int | None) -> tuple[int, int | None]:
    """``(tokens in the store, total)`` for the progress bar: the total is the ``max_tokens`` cap, or
    (without one) the tokens so far extrapolated over the documents left (``None`` before a
    document is finished).

    >>> r = CollectReport(out="x", documents_total=10, documents_skipped=0)
    >>> _token_progress(300, 0, 2, r, None), _token_progress(300, 0, 2, r, 1000), _token_progress(0, 0, 0, r, None)
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


# -- measurement ------------------------------------------------------------------------------


def benchmark_collect(upper, lower, texts, *, spec: CollectSpec = CollectSpec(), repeats: int = 3,
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
    import tempfile

    _check_models(upper, lower)
    texts = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    sources = _sources(texts)
    up, lo, same = _models(upper, lower, spec)
    shared = same or _tokenizers_agree(up, lo, sources)
    pool = spec.pool if shared or spec.pool != "none" else "last"
    windows, total = [], 0
    for src in sources:
        for it in _items(src, {"done": []}, up, lo, shared=shared, pool=pool, max_length=spec.max_length,
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
            _forward(up, [w.upper for w in chunk], layers=(), logits=True)
            if not same:
                _forward(lo, [w.lower for w in chunk], layers=(), logits=True)
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
    b, c = float(np.median(bare_s)), float(np.median(coll_s))
    return {
        "tokens": total, "windows": len(windows), "batch_size": bs, "max_length": spec.max_length,
        "target": spec.target, "pool": pool, "same_model": same, "rows": last.rows_added,
        "compressor": (options or StoreOptions()).compressor,
        "widths": list(_Collector(up, lo, spec, same).widths()),
        "bare_tokens_per_s": total / b, "collect_tokens_per_s": last.tokens_added / c,
        "ratio": (last.tokens_added / c) / (total / b),
        "bare_seconds": bare_s, "collect_seconds": coll_s, "collect_phases": last.seconds,
    }
