"""transformers' GGUF loading, quiet and without repeated work: :func:`gguf_loading` around a load.

Loading a ``.gguf`` through transformers (``AutoTokenizer``, ``AutoConfig`` and
``AutoModelForCausalLM`` with ``gguf_file``) runs its ``load_gguf_checkpoint`` three times, and each
run parses the whole file header again with ``gguf.GGUFReader`` — the vocabulary and the merges,
one small memory-map slice per string. Mapping the tensor names then builds a
``gguf.get_tensor_name_map`` for every submodule of the model. For SmolLM2-135M (49 152 tokens,
30 layers) these took about 15 s and 9 s of a 40 s load on 2 cores (py-spy).

Inside :func:`gguf_loading` a file's reader is made once and handed to every later run (the loader
only reads it), a tensor name map is built once per architecture and layer count (it is only
looked up), and each header value is turned into Python once (:func:`_parsed_once`);
transformers' own tqdm bar, which ignores its ``disable_progress_bar`` switch, is silenced.

transformers imports ``GGUFReader`` and ``get_tensor_name_map`` from ``gguf`` inside its
functions, and looks up its ``_gguf_parse_value`` and ``tqdm`` when it calls them, so the context
swaps those names on their modules and puts the originals back at exit; with a transformers or
gguf that lacks one, that part of the load runs as it would without it. Measured on SmolLM2-135M:
``load_model`` 25.1 s → 13.1 s on one core (the logits of a prompt the same bits), ``prismoe
collect`` of 64 tokens 31.7 s → 18.3 s on two; three ``load_gguf_checkpoint`` runs 14.5 s → 8.8 s
with the shared reader, → 7.3 s with the value cache too.

>>> with gguf_loading():
...     pass
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator


@contextlib.contextmanager
def gguf_loading() -> Iterator[None]:
    """Reuse GGUF readers and tensor name maps, and silence transformers' GGUF bar, until exit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_gguf_bar())
        try:
            import gguf
        except ImportError:  # pragma: no cover - the models extra brings gguf
            yield
            return
        readers: dict[str, object] = {}
        original_reader = getattr(gguf, "GGUFReader", None)
        if original_reader is not None:

            def reader(path, *args, **kwargs):
                if args or kwargs:  # another mode than plain reading: not shared
                    return original_reader(path, *args, **kwargs)
                key = os.path.realpath(os.fspath(path))
                if key not in readers:
                    readers[key] = original_reader(path)
                return readers[key]

            stack.enter_context(_swapped(gguf, "GGUFReader", reader))
        original_map = getattr(gguf, "get_tensor_name_map", None)
        if original_map is not None:
            stack.enter_context(_swapped(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(original_map)))
        stack.enter_context(_parsed_once())
        try:
            yield
        finally:
            readers.clear()


@contextlib.contextmanager
def _parsed_once() -> Iterator[None]:
    """Each run of ``load_gguf_checkpoint`` turns every header value of the file into Python (the
    vocabulary string by string: about 1 s a run for SmolLM2): with the readers shared, the same
    value objects come back, so each is parsed once. The cache holds the value object itself and
    checks it is the same one, so an ``id`` is never taken for another object's."""
    found = _gguf_utils_attr("_gguf_parse_value")
    if found is None:
        yield
        return
    gguf_utils, original = found
    cache: dict[int, tuple[object, tuple, object]] = {}

    def parse(value, data_type):
        key = tuple(data_type) if isinstance(data_type, list) else (data_type,)
        hit = cache.get(id(value))
        if hit is not None and hit[0] is value and hit[1] == key:
            return copy.copy(hit[2])
        result = original(value, data_type)
        cache[id(value)] = (value, key, result)
        return copy.copy(result)

    with _swapped(gguf_utils, "_gguf_parse_value", parse):
        try:
            yield
        finally:
            cache.clear()


@contextlib.contextmanager
def _swapped(module, name: str, value) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """Silence the one bar transformers' GGUF reader draws with plain tqdm (not behind its
    ``disable_progress_bar`` switch), like the others while a model loads."""
    found = _gguf_utils_attr("tqdm")
    if found is None:
        yield
        return
    gguf_utils, original = found
    with _swapped(gguf_utils, "tqdm", lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})):
        yield


def _gguf_utils_attr(name: str):
    """``(transformers' GGUF loading module, its attribute name)``, or None when this transformers
    has no such module or attribute (that part of :func:`gguf_loading` then does nothing)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers
        return None
    original = getattr(gguf_utils, name, None)
    return None if original is None else (gguf_utils, original)
