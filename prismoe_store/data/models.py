"""The models pairs are collected from: loading a causal LM and its tokenizer offline, running it.

- :func:`load_model`: a Hugging Face model folder or a ``.gguf`` file (transformers' GGUF support,
  with or without ``accelerate``), nothing fetched from a hub; :func:`load_models` loads the upper
  and lower models (one when they are the same) and :func:`require_lm_head` refuses a model whose
  head transformers had to make up;
- :func:`tokenizers_agree`: whether the two tokenizers encode a probe of the texts identically
  (then token positions can be matched);
- :func:`forward_pass`, :func:`embed_tokens`, :func:`hidden_index`: one padded forward pass with
  the hidden states asked for, input embeddings, and ``hidden_states`` indices.

Layers index the model's ``hidden_states`` tuple: ``0`` is the embedding output, ``i`` the output of
decoder block ``i``, and the last (``-1``) is **after the final norm** (see
:mod:`prismoe_store.data.collect`).

>>> load_model("/nonexistent/model")
Traceback (most recent call last):
...
prismoe_store.errors.SourceError: no model at /nonexistent/model
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from prismoe_store.data.gguf_loading import gguf_loading
from prismoe_store.data.texts import TextSource, iter_documents
from prismoe_store.errors import DataError, ModelError, SourceError
from prismoe_store.sources.gguf_file import GGUFSource

if TYPE_CHECKING:  # transformers is an optional dependency (the `models` extra), imported when a model loads
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "float16", "bfloat16")  # compute dtypes of the models
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "*.pt", "*.pth")
_PROBE_DOCS = 64  # documents per text used to decide whether two tokenizers agree

Notice = Callable[[str], None]  # notice(message): one-line messages for the user


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM and its tokenizer, loaded offline by :func:`load_model`."""

    model: PreTrainedModel  # a transformers ``*ForCausalLM``, in eval mode on its device
    tokenizer: PreTrainedTokenizerBase  # its tokenizer (fast)
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
    """``(folder, gguf file name or None)`` for a model folder or a ``.gguf`` file; clear errors.

    A GGUF's header is read and every tensor's byte range checked against the file's size
    (:class:`~prismoe_store.sources.gguf_file.GGUFSource`, as ``extract`` and ``head`` do), so a
    truncated or corrupt file is named as such before transformers reads it."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"no model at {spec}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf: give a model folder or a .gguf file")
        GGUFSource(path)
        return path.parent, path.name
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            GGUFSource(ggufs[0])
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
        import torch  # noqa: F401 (the models need it: fail here with the extra's name)
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - transformers is an optional extra
        raise ModelError("loading models needs the models extra: pip install -e '.[models]' in the project's "
                         f"checkout, or pip install 'transformers>=4.45' 'accelerate>=0.26' ({e})") from None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    tdtype = _torch_dtype(dtype)
    where = folder / gguf_name if gguf_name else folder
    stack = contextlib.ExitStack()
    try:
        kw = {"gguf_file": gguf_name} if gguf_name else {}
        stack.enter_context(gguf_loading())
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        missing: list[str] = []
        if gguf_name and not transformers.utils.is_accelerate_available():
            model = _load_gguf_without_accelerate(folder, gguf_name, tdtype)  # refuses missing tensors itself
        else:
            # with output_loading_info transformers returns (model, info); its annotation names the model only
            model, loading = cast("tuple[PreTrainedModel, dict[str, list[str]]]", AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, **kw, **_dtype_kwarg(tdtype), output_loading_info=True))
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


def hidden_index(lm: LoadedModel, layer: int, what: str) -> int:
    """``layer`` (negative counts from the end) as an index into ``lm``'s ``hidden_states`` tuple;
    :class:`~prismoe_store.errors.DataError` naming ``what`` when it is out of range."""
    n = lm.num_layers + 1
    if not -n <= layer < n:
        raise DataError(f"{what} {layer} out of range: the model has hidden states 0..{n - 1} (or -{n}..-1)")
    return layer % n


def forward_pass(lm: LoadedModel, seqs: list[list[int]], *, layers: tuple[int, ...], logits: bool):
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


def embed_tokens(lm: LoadedModel, ids: list[int]):
    """``[len(ids), H]``: ``lm``'s input embeddings of the token ids (on its device)."""
    import torch

    with torch.inference_mode():
        return lm.model.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.long, device=lm.device))


def tokenizers_agree(upper: LoadedModel, lower: LoadedModel, sources: list[TextSource]) -> bool:
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


def _loading_note(model) -> str:
    """What loading ``model`` involves, for the notice before it."""
    path = Path(str(model))
    if path.suffix.lower() == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        return ("transformers dequantizes the GGUF into float tensors first; for scale, SmolLM2-135M's "
                "98 MB file loads in about 15 s on 2 cores")
    return "transformers reads the weights; large models take a while"


def check_model_paths(*models) -> None:
    """Fail fast (before the slow loading) on model paths that cannot work (:class:`LoadedModel` s pass).

    >>> check_model_paths("/nonexistent/model")
    Traceback (most recent call last):
    ...
    prismoe_store.errors.SourceError: no model at /nonexistent/model
    """
    for m in models:
        if isinstance(m, (str, os.PathLike)):
            _locate(str(m))


def load_models(upper, lower, *, device: str = "cpu", dtype: str = "float32", need_head: bool = False,
                notice: Notice | None = None) -> tuple[LoadedModel, LoadedModel, bool]:
    """``(upper, lower, same)`` as :class:`LoadedModel` s from paths or loaded models (``lower=None``:
    the upper model; ``same``: one model serves both). ``need_head``: refuse a lower model without
    an LM head (:func:`require_lm_head`). ``notice(message)`` hears before each slow load."""
    paths = [m for m in (upper, lower) if isinstance(m, (str, os.PathLike))]
    same = lower is None or lower is upper or (len(paths) == 2 and Path(lower).resolve() == Path(upper).resolve())
    say = notice or (lambda message: None)
    if not isinstance(upper, LoadedModel):
        say(f"loading {'the model' if same else 'the upper model'} {upper} ({_loading_note(upper)})")
        upper = load_model(upper, device=device, dtype=dtype)
    if same:
        lower = upper
    elif not isinstance(lower, LoadedModel):
        say(f"loading the lower model {lower} ({_loading_note(lower)})")
        lower = load_model(lower, device=device, dtype=dtype)
    if need_head:
        require_lm_head(lower)
    return upper, lower, same
