"""Shared fixtures: small checkpoints in real formats, written by the tests themselves.

Writers (plain functions, usable from any test via the fixtures of the same name):

- ``write_safetensors(path, tensors)``: one ``.safetensors`` file; values may be numpy arrays or
  torch tensors (use torch for bfloat16).
- ``write_sharded(folder, tensors, shards=2)``: ``model-0000k-of-0000n.safetensors`` files plus
  ``model.safetensors.index.json`` (a Hugging Face sharded checkpoint).
- ``write_torch(path, tensors)``: a PyTorch state dict saved with ``torch.save`` (zip format).
- ``write_gguf(path, tensors)``: a GGUF file; each value is ``array`` (float32, stored F32) or
  ``(array, "Q4_0")`` to store it quantized with ``gguf.quants.quantize``. Returns what a reader
  must get back: ``{name: gguf.quants.dequantize(stored bytes)}`` (numpy row-major shapes).

Fixtures returning a :class:`Checkpoint` (``path`` to open, ``tensors`` expected back bit for bit):
``safetensors_ckpt``, ``sharded_ckpt``, ``torch_ckpt``, ``npy_ckpt`` (one matrix named by the
file stem), ``gguf_ckpt`` (one tensor per type F32/F16/Q8_0/Q4_0/Q4_1, plus llama.cpp's
``token_embd.weight`` and ``output.weight``). ``llama_tensors`` is the small Llama-like state dict
the first three hold: odd sizes (grid padding), a 1-D norm weight, an embedding and an lm_head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the file or folder a source opens
    tensors: dict  # name -> float32/float64 numpy array a reader must return exactly


def _np(t) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.float().numpy()


def write_safetensors(path, tensors: dict) -> Path:
    """Write ``tensors`` (numpy arrays or torch tensors) to one ``.safetensors`` file."""
    path = Path(path)
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    else:
        import torch
        from safetensors.torch import save_file

        save_file({k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v).contiguous()
                   for k, v in tensors.items()}, str(path))
    return path


def write_sharded(folder, tensors: dict, shards: int = 2) -> Path:
    """Split ``tensors`` round-robin over ``shards`` safetensors files plus the HF index; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        write_safetensors(folder / file, part)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": int(sum(_np(t).nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_torch(path, tensors: dict) -> Path:
    """``torch.save`` a state dict of ``tensors`` (numpy arrays become torch tensors)."""
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in tensors.items()}, str(path))
    return Path(path)


def write_gguf(path, tensors: dict) -> dict:
    """Write a GGUF file; values are arrays (F32) or ``(array, type_name)``. Returns the expected
    dequantized arrays (``gguf.quants.dequantize`` of what was stored)."""
    import gguf
    from gguf.quants import dequantize, quantize

    writer = gguf.GGUFWriter(str(path), arch="llama")
    expected = {}
    for name, value in tensors.items():
        array, type_name = value if isinstance(value, tuple) else (value, "F32")
        qtype = gguf.GGMLQuantizationType[type_name]
        stored = quantize(np.asarray(array, np.float32), qtype)
        writer.add_tensor(name, stored, raw_dtype=None if type_name in ("F32", "F16") else qtype)
        expected[name] = dequantize(stored, qtype).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def llama_tensors() -> dict:
    """A tiny Llama-like state dict (float32): vocab 37, hidden 20, one MLP weight, one norm."""
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((37, 20)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((20, 52)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(20).astype(np.float32),
        "lm_head.weight": rng.standard_normal((37, 20)).astype(np.float32),
    }


@pytest.fixture
def safetensors_ckpt(tmp_path, llama_tensors) -> Checkpoint:
    return Checkpoint(write_safetensors(tmp_path / "model.safetensors", llama_tensors), llama_tensors)


@pytest.fixture
def sharded_ckpt(tmp_path, llama_tensors) -> Checkpoint:
    return Checkpoint(write_sharded(tmp_path / "sharded", llama_tensors, shards=3), llama_tensors)


@pytest.fixture
def torch_ckpt(tmp_path, llama_tensors) -> Checkpoint:
    return Checkpoint(write_torch(tmp_path / "model.pt", llama_tensors), llama_tensors)


@pytest.fixture
def npy_ckpt(tmp_path) -> Checkpoint:
    w = np.random.default_rng(1).standard_normal((45, 19)).astype(np.float32)
    np.save(tmp_path / "matrix.npy", w)
    return Checkpoint(tmp_path / "matrix.npy", {"matrix": w})


GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


@pytest.fixture
def gguf_ckpt(tmp_path) -> Checkpoint:
    """One ``(24, 96)`` tensor per type in ``GGUF_TYPES`` named ``<type>.weight``, plus llama.cpp's
    ``token_embd.weight`` (Q8_0) and ``output.weight`` (F16), and a 1-D ``output_norm.weight``."""
    rng = np.random.default_rng(2)
    spec = {f"{t.lower()}.weight": (rng.standard_normal((24, 96)), t) for t in GGUF_TYPES}
    spec["token_embd.weight"] = (rng.standard_normal((40, 64)), "Q8_0")
    spec["output.weight"] = (rng.standard_normal((40, 64)), "F16")
    spec["output_norm.weight"] = rng.standard_normal(64)
    return Checkpoint(tmp_path / "model.gguf", write_gguf(tmp_path / "model.gguf", spec))


@pytest.fixture(name="write_safetensors")
def _write_safetensors_fixture():
    return write_safetensors


@pytest.fixture(name="write_sharded")
def _write_sharded_fixture():
    return write_sharded


@pytest.fixture(name="write_torch")
def _write_torch_fixture():
    return write_torch


@pytest.fixture(name="write_gguf")
def _write_gguf_fixture():
    return write_gguf
