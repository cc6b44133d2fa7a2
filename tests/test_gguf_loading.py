"""transformers' GGUF loading inside :func:`gguf_loading`: the file is parsed once for the
tokenizer, the config and the weights, the loaded model is the same as without the context, and
the patched names are back afterwards."""

import pytest
from tiny_models import save_llama, write_llama_gguf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-loading")
    return write_llama_gguf(save_llama(d / "llama"), d / "llama.gguf")


def test_a_gguf_model_is_parsed_once_and_loads_the_same(tiny_gguf, monkeypatch):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from prismoe_store.data import gguf_loading as module
    from prismoe_store.data.models import load_model

    made = []
    original = gguf.GGUFReader

    def counting(path, *args, **kwargs):
        made.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    names_before = (gguf.get_tensor_name_map,)
    lm = load_model(tiny_gguf)
    assert made == [str(tiny_gguf)]  # tokenizer, config and weights share one reader
    assert gguf.GGUFReader is counting and (gguf.get_tensor_name_map,) == names_before  # put back
    plain = load_gguf_checkpoint(str(tiny_gguf), return_tensors=True, model_to_load=lm.model)
    made.clear()
    # the same parsed header and tensors as a plain, uncached load, read twice inside the context
    with module.gguf_loading():
        first = load_gguf_checkpoint(str(tiny_gguf), return_tensors=True, model_to_load=lm.model)
        first["tokenizer"]["tokens"].append("changed")  # a caller's change reaches no later load
        first["tokenizer"]["tokens"].pop()
        first["tokenizer"]["merges"][0] = "changed"
        again = load_gguf_checkpoint(str(tiny_gguf), return_tensors=True, model_to_load=lm.model)
        first["tokenizer"]["merges"][0] = plain["tokenizer"]["merges"][0]
    assert made == [str(tiny_gguf)]  # one new reader for the new context
    for got in (first, again):
        assert got["config"] == plain["config"] and got["tokenizer"] == plain["tokenizer"]
        assert set(got["tensors"]) == set(plain["tensors"])
        assert all(torch.equal(torch.as_tensor(got["tensors"][k]), torch.as_tensor(plain["tensors"][k]))
                   for k in plain["tensors"])
    assert torch.equal(lm.model.state_dict()["model.embed_tokens.weight"],
                       torch.as_tensor(plain["tensors"]["model.embed_tokens.weight"]))
