"""A PyTorch ``.pt``/``.bin``/``.pth``/``.ckpt`` file as a :class:`~prismoe_store.sources.base.Source`.

The file is a state dict (nested dicts flattened to dotted names) or one tensor, loaded with
``torch.load(weights_only=True, mmap=True)`` afresh for each read (cheap: only the pickle is
parsed). Files in the legacy, non-zip format cannot be mapped; they are loaded whole once.

Weights-only loading never runs code from the file: a pickle that needs another global (a
fairseq checkpoint's ``argparse.Namespace``) is refused with that global's name and the two ways
on — allow that one global (``allow_globals``, ``--allow-global``) or re-save the state dict.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from prismoe_store.errors import SourceError, UnsafeCheckpointError
from prismoe_store.sources.base import Source, reading
from prismoe_store.sources.records import CheckpointFacts, TensorInfo

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class TorchSource(Source):
    """A ``torch.save``d state dict or tensor."""

    format = "torch"

    def __init__(self, path, facts: CheckpointFacts | None = None, *, allow_globals: Sequence[str] = ()):
        super().__init__(path, facts)
        self._globals = [import_global(g) for g in allow_globals]
        if not os.path.isfile(self.path):
            raise SourceError(f"no such file: {self.path}")
        self._mmap = zipfile.is_zipfile(self.path)
        state = self._load()
        self._cached = None if self._mmap else state
        self._infos = {k: TensorInfo(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in state.items()}

    def _load(self) -> dict:
        import torch

        with reading(self.path, "a PyTorch checkpoint"):
            try:
                with torch.serialization.safe_globals(self._globals):
                    obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self._mmap)
            except pickle.UnpicklingError as e:
                raise _refusal(self.path, str(e)) from None
        return flatten_state(obj, Path(self.path).stem)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def files(self) -> list[str]:
        return [self.path]

    def _state(self) -> dict:
        return self._cached if self._cached is not None else self._load()

    def read_stored(self, name, rows, cols):
        return self._state()[name][rows, cols]

    def read_stored_all(self, name):
        return self._state()[name]


def _refusal(path: str, message: str) -> SourceError:
    """The error for a pickle that weights-only loading refused (not a damaged file)."""
    found = _GLOBAL.search(message)
    if found is None:
        if "Weights only load failed" not in message:
            return SourceError(f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt?): "
                               + " ".join(message.split())[:300])
        detail = next((ln.strip() for ln in message.splitlines() if "WeightsUnpickler error" in ln), message)
        return UnsafeCheckpointError(f"{path} cannot be loaded safely (weights only): {' '.join(detail.split())[:300]}")
    name = found.group(1)
    return UnsafeCheckpointError(
        f"{path} is an intact PyTorch pickle that needs the global {name}, which weights-only loading refuses "
        f"(unpickling arbitrary globals can run code). If you trust the file: allow just that one with "
        f"--allow-global {name} (library: allow_globals=[{name!r}], i.e. torch.serialization.add_safe_globals), "
        f"or re-save its state dict: torch.save(torch.load(path, weights_only=False)['model'], 'weights.pt')")


def import_global(dotted: str):
    """The object named ``module.attr`` (``argparse.Namespace``), for weights-only allowlisting."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    raise SourceError(f"cannot import the global {dotted!r} to allow it (give module.Name, e.g. argparse.Namespace)")


def flatten_state(obj, stem: str, prefix: str = "") -> dict:
    """``{dotted.name: tensor}`` from a tensor, a state dict, or dicts of state dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip(".") or stem: obj}
    out: dict = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (torch.Tensor, Mapping)):
                out.update(flatten_state(v, stem, f"{prefix}{k}."))
    return out
