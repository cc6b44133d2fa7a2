"""The checkpoint-source contract, run against every backend.

Each backend opens a checkpoint written here in its real format (numpy ``.npy``, safetensors,
a sharded safetensors index, ``torch.save`` read with ``weights_only``, GGUF with quantized
tensors, a Hugging Face folder written by ``save_pretrained``) and must: list exactly the tensors
written, with their shapes; resolve every name to itself; read any region of a 2-D tensor equal to
the original bit for bit (a quantized GGUF tensor: equal to ``gguf.quants.dequantize`` of its
stored blocks); read small tensors whole; account for its files; and refuse a missing name with
:class:`~prismoe_store.errors.TensorNotFoundError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import write_sharded, write_torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prismoe_store.errors import TensorNotFoundError
from prismoe_store.sources.base import Source
from prismoe_store.sources.checkpoint import open_source
from prismoe_store.sources.gguf_file import GGUFSource
from prismoe_store.sources.npy_file import NpySource
from prismoe_store.sources.safetensors_file import SafetensorsSource
from prismoe_store.sources.sharded import ShardedSource
from prismoe_store.sources.torch_file import TorchSource


@dataclass(frozen=True)
class Case:
    source: Source  # the opened checkpoint
    expected: dict  # name -> the values a reader must return exactly (float32 / float64)
    backend: type  # the Source class open_source must pick


def _hf_folder(tmp_path: Path) -> Case:
    from safetensors.numpy import load_file
    from tiny_models import save_llama

    folder = save_llama(tmp_path / "hf", hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24, vocab_size=120)
    original = load_file(str(folder / "model.safetensors"))  # what save_pretrained wrote, read independently
    return Case(open_source(folder), {k: v.astype(np.float32) for k, v in original.items()}, SafetensorsSource)


@pytest.fixture(params=["npy", "safetensors", "sharded", "torch", "gguf", "hf_folder"])
def case(request, tmp_path, llama_tensors) -> Case:
    kind = request.param
    if kind == "npy":
        c = request.getfixturevalue("npy_ckpt")
        return Case(open_source(c.path), c.tensors, NpySource)
    if kind == "safetensors":
        c = request.getfixturevalue("safetensors_ckpt")
        return Case(open_source(c.path), c.tensors, SafetensorsSource)
    if kind == "sharded":
        folder = write_sharded(tmp_path / "sharded", llama_tensors, shards=3)
        return Case(open_source(folder / "model.safetensors.index.json"), llama_tensors, ShardedSource)
    if kind == "torch":
        path = write_torch(tmp_path / "model.pt", llama_tensors)
        return Case(open_source(path), llama_tensors, TorchSource)
    if kind == "gguf":
        c = request.getfixturevalue("gguf_ckpt")
        return Case(open_source(c.path), c.tensors, GGUFSource)
    return _hf_folder(tmp_path)


def _matrices(c: Case) -> list[str]:
    return sorted(n for n, v in c.expected.items() if v.ndim == 2)


def test_the_backend_is_chosen_from_what_is_on_disk(case):
    assert type(case.source) is case.backend and isinstance(case.source, Source)
    assert case.source.format and Path(case.source.path).exists()


def test_lists_exactly_the_tensors_written(case):
    listed = case.source.tensors()
    assert sorted(listed) == sorted(case.expected)
    for name, values in case.expected.items():
        assert listed[name].name == name and listed[name].shape == values.shape


def test_every_name_resolves_to_itself(case):
    for name in case.expected:
        r = case.source.resolution(name)
        assert (r.asked, r.tensor, r.rule) == (name, name, "exact")
        assert case.source.resolve(name) == case.source.tensors()[name]


def test_whole_matrices_read_bit_for_bit(case):
    for name in _matrices(case):
        got = case.source.read(name, slice(None))
        want = case.expected[name]
        assert got.flags.c_contiguous and got.dtype == (np.float64 if want.dtype == np.float64 else np.float32)
        assert got.shape == want.shape and np.array_equal(got, want), name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_region_reads_bit_for_bit(case, data):
    name = data.draw(st.sampled_from(_matrices(case)))
    rows, cols = case.expected[name].shape
    r0, c0 = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    r1, c1 = data.draw(st.integers(r0 + 1, rows)), data.draw(st.integers(c0 + 1, cols))
    got = case.source.read(name, slice(r0, r1), slice(c0, c1))  # GGUF: windows cut quant blocks anywhere
    assert got.flags.c_contiguous and np.array_equal(got, case.expected[name][r0:r1, c0:c1])


def test_quantized_gguf_tensors_equal_gguf_dequantize(gguf_ckpt):
    """The fixture's expected values are ``gguf.quants.dequantize`` of the stored blocks."""
    src = open_source(gguf_ckpt.path)
    quantized = [n for n, info in src.tensors().items() if info.dtype.startswith("Q")]
    assert sorted(quantized) == ["q4_0.weight", "q4_1.weight", "q8_0.weight", "token_embd.weight"]
    for name in quantized:
        assert np.array_equal(src.read(name, slice(None)), gguf_ckpt.tensors[name]), name


def test_small_tensors_read_whole(case):
    for name, want in case.expected.items():
        if want.ndim == 1:
            assert np.array_equal(case.source.read_array(name), want.astype(np.float32)), name


def test_files_and_size_account_for_the_checkpoint(case):
    files = case.source.files()
    assert files and all(os.path.isfile(f) for f in files)
    assert case.source.size() == sum(os.path.getsize(f) for f in files)
    name = _matrices(case)[0]
    assert case.source.stamp(name) == case.source.stamp(name)  # deterministic: a resume compares it


def test_a_missing_name_is_refused(case):
    with pytest.raises(TensorNotFoundError):
        case.source.info("no.such.tensor")
    with pytest.raises(TensorNotFoundError):
        case.source.resolve("no.such.tensor")
    with pytest.raises(TensorNotFoundError):
        case.source.read("no.such.tensor", slice(0, 1))
