"""Extraction from real-format checkpoints (written by the fixtures in conftest.py) into weights stores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import GGUF_TYPES, write_safetensors, write_torch

from cli.main import main
from prismoe_store.data.extract import extract, open_source, tile
from prismoe_store.errors import IncompleteStoreError, SourceError, StoreError, TensorNotFoundError
from prismoe_store.sources.records import CheckpointFacts, TensorInfo
from prismoe_store.sources.resolve import resolve
from prismoe_store.stores.formats import StoreOptions
from prismoe_store.stores.weights import WeightsStore

REPO = Path(__file__).resolve().parents[1]
CKPTS = ["safetensors_ckpt", "sharded_ckpt", "torch_ckpt"]


def _store(tmp_path, name="store") -> str:
    return str(tmp_path / name)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", CKPTS)
@pytest.mark.parametrize("tensor", ["lm_head.weight", "model.layers.0.mlp.down_proj.weight"])
def test_round_trip_is_bit_exact(request, tmp_path, ckpt, tensor):
    c = request.getfixturevalue(ckpt)
    store = extract(c.path, _store(tmp_path), tensors=[tensor], workers=8, options=StoreOptions(compressor="none"))
    out = store.read(tensor)
    assert out.dtype == np.float32 and np.array_equal(out, c.tensors[tensor])
    info = store.info(tensor)
    assert info["source_tensor"] == tensor and info["source_shape"] == list(c.tensors[tensor].shape)


def test_npy_round_trip_in_small_blocks(tmp_path, npy_ckpt):
    store = extract(npy_ckpt.path, _store(tmp_path), tensors=["matrix"], workers=32, block_bytes=64)
    assert np.array_equal(store.read("matrix"), npy_ckpt.tensors["matrix"])


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_gguf_matches_gguf_dequantize_exactly(tmp_path, gguf_ckpt, gguf_type):
    name = f"{gguf_type.lower()}.weight"
    store = extract(gguf_ckpt.path, _store(tmp_path), tensors=[name], workers=16, block_bytes=1)
    assert np.array_equal(store.read(name), gguf_ckpt.tensors[name])
    assert store.info(name)["source_dtype"] == gguf_type


def test_bf16_and_fp16_sources(tmp_path):
    bf = torch.randn(33, 17).to(torch.bfloat16)
    f16 = np.random.default_rng(3).standard_normal((33, 17)).astype(np.float16)
    path = write_safetensors(tmp_path / "half.safetensors", {"bf": bf, "h": torch.from_numpy(f16)})
    store = extract(path, _store(tmp_path), tensors=["bf", "h"], workers=4, dtype="source")
    assert store.read("bf").dtype == np.float32 and np.array_equal(store.read("bf"), bf.float().numpy())
    assert store.read("h").dtype == np.float16 and np.array_equal(store.read("h"), f16)
    as16 = extract(path, _store(tmp_path, "s16"), tensors=["bf"], workers=4, dtype="float16").read("bf")
    assert as16.dtype == np.float16 and np.array_equal(as16, bf.float().numpy().astype(np.float16))


def test_memory_store(npy_ckpt):
    store = extract(npy_ckpt.path, "memory://test-extract", tensors=["matrix"], workers=4, overwrite=True)
    again = WeightsStore.open("memory://test-extract")
    assert np.array_equal(again.read("matrix"), npy_ckpt.tensors["matrix"]) and store.url == "memory://test-extract"


def test_sharded_store(tmp_path, safetensors_ckpt):
    options = StoreOptions(shard=True, compressor="blosc")
    store = extract(safetensors_ckpt.path, _store(tmp_path), tensors=["lm_head"], workers=16, options=options)
    assert store.group["tensors/lm_head"].shards is not None
    assert np.array_equal(store.read("lm_head"), safetensors_ckpt.tensors["lm_head.weight"])


def test_torch_variants(tmp_path):
    w = np.random.default_rng(4).standard_normal((9, 5)).astype(np.float32)
    torch.save({"state_dict": {"model": {"lm_head.weight": torch.from_numpy(w)}}, "epoch": 3}, tmp_path / "nested.ckpt")
    torch.save(torch.from_numpy(w), tmp_path / "bare.pt")
    torch.save({"lm_head.weight": torch.from_numpy(w)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for i, file in enumerate(["nested.ckpt", "bare.pt", "legacy.bin"]):
        store = extract(tmp_path / file, _store(tmp_path, f"s{i}"), workers=2)
        assert np.array_equal(store.read("lm_head"), w), file
    assert open_source(tmp_path / "nested.ckpt").resolve("lm_head").name == "state_dict.model.lm_head.weight"


def test_folder_sources(tmp_path, llama_tensors):
    (tmp_path / "hf").mkdir()
    write_safetensors(tmp_path / "hf" / "model.safetensors", llama_tensors)
    assert open_source(tmp_path / "hf").format == "safetensors"
    (tmp_path / "bin").mkdir()
    write_torch(tmp_path / "bin" / "pytorch_model.bin", llama_tensors)
    head = open_source(tmp_path / "bin").read("lm_head", slice(0, 5))
    assert np.array_equal(head, llama_tensors["lm_head.weight"][:5])
    (tmp_path / "two").mkdir()
    np.save(tmp_path / "two" / "a.npy", np.zeros((2, 2)))
    np.save(tmp_path / "two" / "b.npy", np.zeros((2, 2)))
    with pytest.raises(SourceError, match="a.npy, b.npy"):
        open_source(tmp_path / "two")


# -- names -----------------------------------------------------------------------------------


TIED = CheckpointFacts(tied=True, tied_why="config.json: tie_word_embeddings=true")


@pytest.mark.parametrize("names, alias, facts, expected", [
    (["lm_head.weight", "model.embed_tokens.weight"], "lm_head", None, "lm_head.weight"),
    (["lm_head.weight", "model.embed_tokens.weight"], "embedding", None, "model.embed_tokens.weight"),
    (["model.embed_tokens.weight", "model.norm.weight"], "lm_head", TIED, "model.embed_tokens.weight"),  # tied
    (["model.embed_tokens.weight", "model.norm.weight"], "lm_head", None, None),  # nothing says tied
    (["transformer.wte.weight", "transformer.wpe.weight"], "lm_head", TIED, "transformer.wte.weight"),  # GPT-2
    (["bert.embeddings.word_embeddings.weight"], "embedding", None, "bert.embeddings.word_embeddings.weight"),
    (["embeddings.word_embeddings.weight", "pooler.dense.weight"], "lm_head", TIED,
     "embeddings.word_embeddings.weight"),
    (["token_embd.weight", "output.weight"], "lm_head", None, "output.weight"),  # GGUF
    (["model.language_model.embed_tokens.weight", "x"], "embedding", None, "model.language_model.embed_tokens.weight"),
    (["foo.my_lm_head.weight", "x"], "lm_head", None, "foo.my_lm_head.weight"),  # unique suffix
    (["a.weight", "b.weight"], "lm_head", None, None),
    (["W"], "lm_head", None, "W"),  # a lone matrix (.npy) answers to every alias
    (["model.embed_tokens.weight"], "lm_head", None, None),  # ... unless it is named as the other one
    (["model.embed_tokens.weight"], "lm_head", TIED, "model.embed_tokens.weight"),
    (["a.weight", "b.weight"], "c.weight", None, None),
])
def test_resolve(names, alias, facts, expected):
    infos = {n: TensorInfo(n, (4, 3), "F32") for n in names}
    if expected is None:
        with pytest.raises(TensorNotFoundError):
            resolve(infos, alias, facts or CheckpointFacts())
    else:
        assert resolve(infos, alias, facts or CheckpointFacts()).tensor == expected


def test_aliases_in_a_checkpoint(tmp_path, safetensors_ckpt, gguf_ckpt):
    store = extract(safetensors_ckpt.path, _store(tmp_path), tensors=["lm_head", "embedding"], workers=4)
    assert np.array_equal(store.read("embedding"), safetensors_ckpt.tensors["model.embed_tokens.weight"])
    assert store.info("lm_head")["source_tensor"] == "lm_head.weight"
    g = extract(gguf_ckpt.path, _store(tmp_path, "g"), tensors={"head": "lm_head", "emb": "embedding"}, workers=4)
    assert np.array_equal(g.read("head"), gguf_ckpt.tensors["output.weight"])
    assert np.array_equal(g.read("emb"), gguf_ckpt.tensors["token_embd.weight"])


def test_tied_embedding(tmp_path, llama_tensors):
    """The embedding stands in for a missing head only when config.json says the head is tied."""
    import json

    tied = {k: v for k, v in llama_tensors.items() if k != "lm_head.weight"}
    path = write_safetensors(tmp_path / "model.safetensors", tied)
    with pytest.raises(TensorNotFoundError, match="nothing says the head is tied"):
        extract(path, _store(tmp_path), workers=4)
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    store = extract(path, _store(tmp_path), workers=4)
    assert np.array_equal(store.read("lm_head"), tied["model.embed_tokens.weight"])
    assert store.info("lm_head")["source_tensor"] == "model.embed_tokens.weight"
    assert store.info("lm_head")["source_resolution"]["rule"] == "tied"
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    with pytest.raises(TensorNotFoundError, match="lacks its head"):
        extract(path, _store(tmp_path, "untied"), workers=4)


def test_missing_tensor_lists_names(safetensors_ckpt):
    with pytest.raises(TensorNotFoundError, match="model.norm.weight"):
        open_source(safetensors_ckpt.path).resolve("nope")


# -- bad input through the CLI ---------------------------------------------------------------


def _truncated(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def _unsupported_gguf(tmp_path) -> Path:
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    writer = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), arch="llama")
    writer.add_tensor("output.weight", np.zeros((8, 2 * size), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return tmp_path / "q81.gguf"


def _junk(path: Path) -> Path:
    path.write_bytes(b"\x00" * 64)
    return path


BAD_INPUTS = {
    "missing file": (lambda p, c: (p / "nope.safetensors", []), "no such file"),
    "missing tensor": (lambda p, c: (c["st"], ["--tensor", "nope.weight"]), "model.embed_tokens.weight"),
    "truncated safetensors": (lambda p, c: (_truncated(c["st"]), []), "truncated or corrupt"),
    "truncated gguf": (lambda p, c: (_truncated(c["gguf"]), []), "truncated"),
    "1-D tensor": (lambda p, c: (c["st"], ["--tensor", "model.norm.weight"]), "only 2-D"),
    "unsupported gguf type": (lambda p, c: (_unsupported_gguf(p), []), "Q8_1"),
    "garbage file": (lambda p, c: (_junk(p / "junk.dat"), []), "junk.dat"),
    "truncated torch": (lambda p, c: (_truncated(c["pt"], 0.5), []), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error(tmp_path, safetensors_ckpt, gguf_ckpt, torch_ckpt, case):
    make, needle = BAD_INPUTS[case]
    source, args = make(tmp_path, {"st": safetensors_ckpt.path, "gguf": gguf_ckpt.path, "pt": torch_ckpt.path})
    store = tmp_path / "out"
    result = CliRunner().invoke(main, ["extract", str(source), "-o", str(store), "-q", *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], result.output
    assert "Traceback" not in result.output
    assert not store.exists()  # nothing was written that could later read back wrong


def test_cli_extract_and_tile(tmp_path, sharded_ckpt, npy_ckpt):
    r = CliRunner().invoke(main, ["extract", str(sharded_ckpt.path), "-o", _store(tmp_path), "-t", "lm_head",
                                  "-t", "embedding", "--workers", "8", "--compressor", "none", "-q"])
    assert r.exit_code == 0, r.output
    assert "lm_head: lm_head.weight [37×20, F32]" in r.output
    r = CliRunner().invoke(main, ["tile", str(npy_ckpt.path), "-o", "memory://cli-tile", "--overwrite",
                                  "--name", "W", "--workers", "4", "--shard", "-q", "--json"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(WeightsStore.open("memory://cli-tile").read("W"), npy_ckpt.tensors["matrix"])


def test_tile_refuses_many_matrices(torch_ckpt):
    with pytest.raises(SourceError, match="holds 3 matrices"):
        tile(torch_ckpt.path, "memory://test-tile-many", overwrite=True)


# -- interruption and resume -----------------------------------------------------------------


class _Stop(Exception):
    pass


def _stop_after(calls: int):
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) > calls:
            raise _Stop

    return progress


def _chunk_stamps(store: str, tensor: str) -> dict[str, tuple[int, int]]:
    root = Path(store) / "tensors" / tensor / "c"
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("shard", [False, True])
def test_resume_keeps_finished_tiles(tmp_path, safetensors_ckpt, shard):
    url, options = _store(tmp_path), StoreOptions(shard=shard)
    with pytest.raises(_Stop):  # stops after 3 units (1-tile blocks, or bands when sharded)
        extract(safetensors_ckpt.path, url, workers=32, options=options, block_bytes=1, progress=_stop_after(3))
    with pytest.raises(IncompleteStoreError):
        WeightsStore.open(url).read("lm_head")
    before = _chunk_stamps(url, "lm_head")
    assert 0 < len(before) < 20
    time.sleep(0.05)
    calls = []
    store = extract(safetensors_ckpt.path, url, workers=32, options=options, block_bytes=1,
                    progress=lambda d, t: calls.append((d, t)))
    after = _chunk_stamps(url, "lm_head")
    assert {k: after[k] for k in before} == before  # finished chunks were not rewritten
    assert calls[0][0] == 3 and calls[-1] == (calls[-1][1], calls[-1][1])
    assert np.array_equal(store.read("lm_head"), safetensors_ckpt.tensors["lm_head.weight"])


def test_resume_after_kill(tmp_path, safetensors_ckpt):
    """A hard kill (SIGKILL mid-run) leaves an incomplete store that a re-run completes."""
    url = _store(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal
        from prismoe_store.data.extract import extract
        def progress(done, total):
            if done >= 6:
                os.kill(os.getpid(), signal.SIGKILL)
        extract({str(safetensors_ckpt.path)!r}, {url!r}, workers=32, block_bytes=1, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    with pytest.raises(IncompleteStoreError):
        WeightsStore.open(url).read("lm_head")
    store = extract(safetensors_ckpt.path, url, workers=32, block_bytes=1)
    assert np.array_equal(store.read("lm_head"), safetensors_ckpt.tensors["lm_head.weight"])


def test_source_damaged_mid_run_leaves_an_incomplete_tensor(tmp_path, npy_ckpt):
    """A source that breaks during extraction: SourceError, and the tensor reads as incomplete."""
    def truncate(done, total):
        if done >= 2:
            os.truncate(npy_ckpt.path, 200)

    url = _store(tmp_path)
    with pytest.raises(SourceError, match="truncated or corrupt"):
        extract(npy_ckpt.path, url, tensors=["matrix"], workers=32, block_bytes=1, progress=truncate)
    with pytest.raises(IncompleteStoreError):
        WeightsStore.open(url).read("matrix")


def test_resume_refuses_another_source_tensor(tmp_path, safetensors_ckpt):
    url = _store(tmp_path)
    extract(safetensors_ckpt.path, url, tensors={"W": "lm_head.weight"}, workers=4)
    with pytest.raises(StoreError, match="source_tensor"):
        extract(safetensors_ckpt.path, url, tensors={"W": "model.embed_tokens.weight"}, workers=4)


# -- memory ----------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_rss_stays_flat_on_a_64mb_matrix(tmp_path):
    """Peak RSS growth while extracting a 64 MiB matrix in small blocks stays a fraction of it."""
    rows, cols = 4096, 4096
    np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.float32, (rows, cols))[:] = 1.5
    script = textwrap.dedent(f"""
        from prismoe_store.data.extract import extract
        from prismoe_store.stores.formats import StoreOptions
        def kb(key):  # VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        base = kb("VmRSS")
        extract({str(tmp_path / "big.npy")!r}, {str(tmp_path / "store")!r}, tensors=["big"], workers=64,
                options=StoreOptions(compressor="none"), block_bytes=2**20)
        print(base, kb("VmHWM"))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    base_kb, peak_kb = map(int, out.stdout.split())
    assert (peak_kb - base_kb) * 1024 < 0.25 * rows * cols * 4, (base_kb, peak_kb)
