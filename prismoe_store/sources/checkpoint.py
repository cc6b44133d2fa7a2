"""Open a checkpoint file or folder as a :class:`~prismoe_store.sources.base.Source`, with what it says
about itself.

The backend is chosen by name (``.safetensors``, ``*.index.json``, ``.pt``/``.bin``/``.pth``/
``.ckpt``, ``.gguf``, ``.npy``) or, failing that, by magic bytes. A folder is read from its
``model.safetensors.index.json``, ``pytorch_model.bin.index.json``, ``model.safetensors`` or
``pytorch_model.bin``, else from its only weight file (or its only split GGUF set).

Beside safetensors and PyTorch files, ``config.json`` describes the checkpoint
(:func:`config_facts`): whether the head is tied to the input embedding
(``tie_word_embeddings``, also inside ``text_config``; when absent, transformers' default for
that model type if transformers is installed) and the FP8 block size
(``quantization_config.weight_block_size``). GGUF files describe themselves.

>>> import tempfile, numpy as np
>>> with tempfile.TemporaryDirectory() as d:
...     np.save(f"{d}/w.npy", np.zeros((4, 3), np.float16))
...     open_source(f"{d}/w.npy").tensors()["w"]
TensorInfo(name='w', shape=(4, 3), dtype='float16')
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from prismoe_store.errors import SourceError
from prismoe_store.sources.base import Source
from prismoe_store.sources.gguf_file import SPLIT_NAME, GGUFSource
from prismoe_store.sources.npy_file import NpySource
from prismoe_store.sources.records import CheckpointFacts, parse_block_size
from prismoe_store.sources.safetensors_file import SafetensorsSource
from prismoe_store.sources.sharded import ShardedSource
from prismoe_store.sources.torch_file import TorchSource

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SUFFIXES = (".safetensors", ".gguf", ".npy", *_TORCH_SUFFIXES)
_FOLDER_FILES = (  # what a model folder is read from, first found wins
    "model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin",
)


def open_source(path: str | os.PathLike, *, allow_globals: Sequence[str] = ()) -> Source:
    """Open a checkpoint file or folder.

    ``allow_globals`` names extra globals (``"argparse.Namespace"``) a PyTorch pickle may use
    under weights-only loading; give them only for files you trust.
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"no such file or folder: {p}")
    if p.is_dir():
        return _open_folder(p, allow_globals)
    if p.name.endswith(".index.json"):
        return ShardedSource(p, partial(_open_file, allow_globals=allow_globals), config_facts(p.parent))
    return _open_file(p, allow_globals, described=True)


def _open_file(p: Path, allow_globals: Sequence[str] = (), described: bool = False) -> Source:
    suffix = p.suffix.lower()
    kind = suffix if suffix in _SUFFIXES else _sniff(p)
    facts = config_facts(p.parent) if described and kind in (".safetensors", *_TORCH_SUFFIXES) else None
    if kind == ".safetensors":
        return SafetensorsSource(p, facts)
    if kind == ".gguf":
        return GGUFSource(p)
    if kind == ".npy":
        return NpySource(p)
    return TorchSource(p, facts, allow_globals=allow_globals)


def _open_folder(folder: Path, allow_globals: Sequence[str]) -> Source:
    for name in _FOLDER_FILES:
        if (folder / name).is_file():
            return open_source(folder / name, allow_globals=allow_globals)
    weights = [f for f in sorted(folder.iterdir()) if f.suffix.lower() in _SUFFIXES]
    if len(weights) == 1:
        return open_source(weights[0], allow_globals=allow_globals)
    stems = {m["stem"] if (m := SPLIT_NAME.match(f.name)) else None for f in weights}
    if weights and len(stems) == 1 and None not in stems:  # one split GGUF set
        return open_source(weights[0], allow_globals=allow_globals)
    found = ", ".join(f.name for f in weights) or "no weight files"
    raise SourceError(f"cannot tell which checkpoint to read in {folder} (found {found}): name a file")


def _sniff(p: Path) -> str:
    with open(p, "rb") as f:
        head = f.read(9)
    if head.startswith(b"GGUF"):
        return ".gguf"
    if head.startswith(b"\x93NUMPY"):
        return ".npy"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch: a zip file, or a legacy pickle
        return ".pt"
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return ".safetensors"
    raise SourceError(f"{p} is not a checkpoint format this tool reads (.safetensors, .pt/.bin, .gguf, .npy)")


def config_facts(folder: Path) -> CheckpointFacts:
    """What ``folder/config.json`` says about the checkpoint beside it (empty facts without one)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return CheckpointFacts()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"{path} is not a JSON object")
    tied, why = _tie_flag(cfg, path)
    qc_value, arch_value = cfg.get("quantization_config"), cfg.get("architectures")
    qc: dict = qc_value if isinstance(qc_value, dict) else {}
    block = qc.get("weight_block_size")
    arch: list = arch_value if isinstance(arch_value, list) else []
    return CheckpointFacts(
        tied=tied, tied_why=why, block_size=parse_block_size(block) if block is not None else None,
        quant_method=str(qc["quant_method"]) if qc.get("quant_method") else None,
        architectures=tuple(str(a) for a in arch))


def _tie_flag(cfg: dict, path: Path) -> tuple[bool | None, str]:
    for section, where in ((cfg, ""), (cfg.get("text_config"), "text_config.")):
        if isinstance(section, dict) and isinstance(section.get("tie_word_embeddings"), bool):
            flag = section["tie_word_embeddings"]
            return flag, f"{path.name}: {where}tie_word_embeddings={str(flag).lower()}"
    return _transformers_default(path.parent, cfg)


def _transformers_default(folder: Path, cfg: dict) -> tuple[bool | None, str]:
    """transformers' own default for a config.json that does not set tie_word_embeddings."""
    if "model_type" not in cfg:
        return None, ""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        flag = getattr(text, "tie_word_embeddings", None)
    except Exception:  # noqa: BLE001 - transformers absent, or a model type it does not know
        return None, ""
    if not isinstance(flag, bool):
        return None, ""
    return flag, (f"config.json has no tie_word_embeddings and transformers' {type(config).__name__} "
                  f"defaults it to {str(flag).lower()}")
