"""PrisMoEHead in a real (tiny, offline) transformers Llama: an adapter holding the model's own
lm_head as tiles must reproduce its logits and, at ρ = 1, its greedy text; plus `prismoe generate`."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from tiny_models import save_llama  # noqa: E402

from prismoe_store.errors import DataError  # noqa: E402
from prismoe_store.grid import plan_grid  # noqa: E402
from prismoe_store.head.generate import PrisMoEHead, generate, load_causal_lm, replace_lm_head  # noqa: E402
from prismoe_store.stores.adapter import AdapterStore  # noqa: E402


def head_adapter(path, weight: np.ndarray, workers: int = 8) -> AdapterStore:
    """One pipe whose tiles are ``weight [vocab, hidden]`` padded onto a grid."""
    vocab, hidden = weight.shape
    g = plan_grid(hidden, vocab, workers)
    padded = np.zeros(g.padded_shape, np.float32)
    padded[:vocab, :hidden] = weight
    a = AdapterStore.create(str(path), grids=[g], attrs={"complete": True})
    for r in range(g.rows):
        a.write_band(0, r, padded[r * g.tile_out:(r + 1) * g.tile_out])
    return a


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    folder = save_llama(d / "model", tie_embeddings=request.param)
    model, _ = load_causal_lm(str(folder))
    weight = model.get_output_embeddings().weight.detach().numpy().copy()
    return folder, head_adapter(d / "head.zarr", weight), weight


def test_head_reproduces_lm_head_logits(llama):
    folder, adapter, weight = llama
    head = PrisMoEHead.from_adapter(adapter, cache_bytes=adapter.grids[0].tile_bytes())  # one tile: streaming
    h = torch.randn(2, 5, weight.shape[1])
    ref = h.double() @ torch.from_numpy(weight).double().T
    got = head(h)
    assert got.shape == (2, 5, weight.shape[0]) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert head(h.bfloat16()).dtype == torch.bfloat16
    assert "in_features=" in repr(head)


def test_replace_checks_widths(llama, tmp_path):
    folder, adapter, weight = llama
    model, _ = load_causal_lm(str(folder))
    wrong = head_adapter(tmp_path / "w.zarr", np.ones((weight.shape[0] + 1, weight.shape[1]), np.float32))
    with pytest.raises(DataError, match="lm_head maps"):
        replace_lm_head(model, PrisMoEHead.from_adapter(wrong))
    old = replace_lm_head(model, PrisMoEHead.from_adapter(adapter))
    assert isinstance(old, torch.nn.Linear) and isinstance(model.get_output_embeddings(), PrisMoEHead)
    assert model.get_input_embeddings().weight.shape == (weight.shape[0], weight.shape[1])


def test_generate_equals_the_original_model_at_rho_1(llama):
    folder, adapter, _ = llama
    g = generate(adapter, str(folder), "the model reads", max_new_tokens=12, compare=True, schedule="serial")
    assert g.new_tokens == 12
    assert g.same and g.agreement == 1.0 and g.identical_prefix == 12
    assert g.text.startswith("the model reads") and g.text != "the model reads"
    assert g.stats["cache"]["misses"] > 0


def test_generate_command(llama):
    from cli.main import main

    folder, adapter, _ = llama
    res = CliRunner().invoke(main, ["generate", adapter.url, "--model", str(folder), "--prompt", "a tile",
                                    "--max-new-tokens", "6", "--compare", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)  # stdout only: transformers draws its loading bar on stderr
    assert info["same"] is True and info["text"] == info["original"]
    assert info["cache"]["peak_bytes"] <= info["cache"]["budget_bytes"]
    res = CliRunner().invoke(main, ["generate", adapter.url, "--model", str(folder), "--prompt", "a", "--compare",
                                    "--max-new-tokens", "3"])
    assert res.exit_code == 0 and "original:" in res.output and "prismoe:" in res.output


def test_head_adapter_and_embedding_keep_the_text_at_all_bands(tmp_path):
    """A head adapter of a tied model's matrix (`prismoe head`), swapped in for both the lm_head and
    the input embedding, generates exactly the original text when every band is computed."""
    from prismoe_store.head.build import HeadConfig, build_head
    from prismoe_store.head.generate import generate_all

    folder = save_llama(tmp_path / "model", tie_embeddings=True)
    build_head(str(folder), str(tmp_path / "head.zarr"), config=HeadConfig(band_rows=16))
    out = generate_all(str(tmp_path / "head.zarr"), str(folder), ["the model reads", "a tile"], max_new_tokens=8,
                       compare=True, embedding=True, sparsity=1.0)
    assert [g.same for g in out] == [True, True] and all(g.agreement == 1.0 for g in out)
    assert out[0].stats["row_share"] == pytest.approx(1.0)


def test_generate_command_many_prompts_on_a_head(tmp_path):
    from cli.main import main
    from prismoe_store.head.build import HeadConfig, build_head

    folder = save_llama(tmp_path / "model", tie_embeddings=True)
    build_head(str(folder), str(tmp_path / "head.zarr"), config=HeadConfig(band_rows=16))
    (tmp_path / "prompts.txt").write_text("the model reads\n\na tile\n")
    res = CliRunner().invoke(main, ["generate", str(tmp_path / "head.zarr"), "--model", str(folder),
                                    "--prompts-file", str(tmp_path / "prompts.txt"), "--prompt", "one more",
                                    "--max-new-tokens", "4", "--compare", "--sparsity", "1", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["summary"] == {"prompts": 3, "same_text": 3, "mean_agreement": 1.0, "mean_identical_prefix": 4.0}
    assert [g["identical_prefix"] for g in info["generations"]] == [4, 4, 4]
    assert res.stderr == "" if hasattr(res, "stderr") else True
