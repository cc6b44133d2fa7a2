"""``prismoe collect`` on tiny real models built offline (tests/tiny_models.py), against references
computed by running the same transformers models directly, one unpadded sequence at a time."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import (
    corpus_lines,
    save_llama,
    save_qwen2,
    write_llama_gguf,
    write_texts,
)

from cli.main import main
from cli.messages import error_line
from prismoe_store import errors
from prismoe_store.data.collect import CollectSpec, collect
from prismoe_store.data.models import load_model
from prismoe_store.errors import CorruptStoreError, DataError
from prismoe_store.stores.pairs import PairsStore

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matrices: one thread is fastest, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two models with different tokenizers, a GGUF copy of the Llama, and two text files."""
    d = tmp_path_factory.mktemp("collect")
    llama = save_llama(d / "llama")
    docs_a = corpus_lines(9, seed=11)
    docs_b = corpus_lines(6, seed=12, min_words=20, max_words=30)  # long: several windows at max_length 24
    return {
        "dir": d, "llama": llama, "gguf": write_llama_gguf(llama, d / "llama.gguf"), "qwen": save_qwen2(d / "qwen"),
        "a": write_texts(d / "a.txt", docs_a), "b": write_texts(d / "b.jsonl", docs_b),
        "docs": docs_a + docs_b,
    }


@pytest.fixture(scope="module")
def llama(world):
    return load_model(world["llama"])


def _reference(lm, text: str, max_length: int = 10**6):
    """Per-token outputs of a document's first ``max_length`` tokens run alone: ids, hidden_states, logits."""
    ids = lm.tokenizer(text)["input_ids"][:max_length]
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    return ids, [h[0].numpy() for h in out.hidden_states], out.logits[0].numpy()


def _run(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def test_logits_target_is_x_times_lm_head(world, llama, tmp_path):
    out = tmp_path / "p"
    report = collect(llama, None, [world["a"], world["b"]], out, spec=CollectSpec(batch_size=3, max_length=24))
    store = PairsStore.open(out)
    x, z = store.read(0, store.rows)
    w = llama.model.lm_head.weight.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(z, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5 * np.abs(z).max())
    # every token of every document, in order, windows of <= 24 tokens run with a fresh context
    ids = [llama.tokenizer(t)["input_ids"] for t in world["docs"]]
    assert store.rows == report.rows_added == report.tokens_total == sum(map(len, ids))
    _, hs, logits = _reference(llama, world["docs"][0], 24)
    np.testing.assert_allclose(x[:len(hs[-1])], hs[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z[:len(logits)], logits, rtol=1e-5, atol=1e-6)
    long_ids = ids[9]  # first document of b.jsonl: several windows
    assert len(long_ids) > 24
    start = sum(map(len, ids[:9]))
    with torch.no_grad():
        ref_w2 = llama.model(torch.tensor([long_ids[24:48]]), output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(x[start + 24:start + 48], ref_w2.numpy(), rtol=1e-5, atol=1e-6)
    prov = store.provenance
    assert prov["settings"]["target"] == "logits" and prov["upper"]["format"] == "folder"
    assert {e["documents"] for e in prov["texts"].values()} == {9, 6}
    assert all(e["done"] == [[0, e["documents"]]] for e in prov["texts"].values())
    assert report.complete


def test_embeddings_target_is_next_token_rows(world, llama, tmp_path):
    out = tmp_path / "p"
    collect(llama, None, [world["a"], world["b"]], out, spec=CollectSpec(target="embeddings", max_length=24))
    x, z = PairsStore.open(out).read(0, 10**9)
    emb = llama.model.get_input_embeddings().weight.detach().numpy()
    nxt = np.concatenate([llama.tokenizer(t)["input_ids"][1:] for t in world["docs"]])
    assert len(z) == len(nxt)  # the last token of each document has no next token; windows do not lose any
    np.testing.assert_array_equal(z, emb[nxt])
    ids, hs, _ = _reference(llama, world["docs"][0], 24)
    k = min(len(ids), len(llama.tokenizer(world["docs"][0])["input_ids"]) - 1)  # rows of its first window
    np.testing.assert_allclose(x[:k], hs[-1][:k], rtol=1e-5, atol=1e-6)


def test_layer_and_hidden_target(world, llama, tmp_path):
    out = tmp_path / "p"
    collect(llama, None, [world["a"]], out, spec=CollectSpec(layer=1, target="hidden", lower_layer=-1))
    x, z = PairsStore.open(out).read(0, 10**9)
    ids, hs, logits = _reference(llama, world["docs"][0])
    n = len(ids)
    np.testing.assert_allclose(x[:n], hs[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z[:n], hs[-1], rtol=1e-5, atol=1e-6)
    # the last hidden state is after the final norm: it times lm_head is the logits
    w = llama.model.lm_head.weight.detach().numpy()
    np.testing.assert_allclose(z[:n] @ w.T, logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="out of range"):
        collect(llama, None, [world["a"]], tmp_path / "q", spec=CollectSpec(layer=3))


def test_pooling_matches_per_token_pairs(world, llama, tmp_path):
    spec = CollectSpec(max_length=512, batch_size=4)
    collect(llama, None, [world["a"]], tmp_path / "tok", spec=spec)
    x, z = PairsStore.open(tmp_path / "tok").read(0, 10**9)
    lengths = [len(llama.tokenizer(t)["input_ids"]) for t in world["docs"][:9]]
    ends = np.cumsum(lengths)
    for pool in ("last", "mean"):
        collect(llama, None, [world["a"]], tmp_path / pool, spec=CollectSpec(pool=pool, batch_size=4))
        px, pz = PairsStore.open(tmp_path / pool).read(0, 10**9)
        assert px.shape == (9, x.shape[1])
        if pool == "last":
            ex, ez = x[ends - 1], z[ends - 1]
        else:
            ex = np.stack([x[e - n:e].mean(0) for e, n in zip(ends, lengths)])
            ez = np.stack([z[e - n:e].mean(0) for e, n in zip(ends, lengths)])
        np.testing.assert_allclose(px, ex, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pz, ez, rtol=1e-5, atol=1e-5)


def test_resume_adds_the_rest_without_duplicates(world, llama, tmp_path):
    texts = [world["a"], world["b"]]
    spec = CollectSpec(batch_size=2, max_length=24)
    full = tmp_path / "full"
    collect(llama, None, texts, full, spec=spec)
    out = tmp_path / "p"
    # stop inside b.jsonl's long documents, part-way through one (windows of 24 tokens)
    budget = PairsStore.open(full).provenance["texts"]
    budget = next(e["tokens"] for e in budget.values() if e["documents"] == 9) + 30
    first = collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24, max_tokens=budget))
    assert not first.complete and first.tokens_total == budget == PairsStore.open(out).rows  # exactly the cap
    partial = [e["partial"] for e in PairsStore.open(out).provenance["texts"].values() if e["partial"]]
    assert partial and partial[0][1] > 0  # a document half done, resumed by window
    again = collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24, max_tokens=budget))
    assert again.rows_added == 0  # the cap is on the store: nothing more to do
    rest = collect(llama, None, texts, out, spec=spec)
    assert rest.complete and rest.documents_skipped > 0
    a, b = PairsStore.open(full), PairsStore.open(out)
    assert a.rows == b.rows and a.provenance["tokens"] == b.provenance["tokens"]
    np.testing.assert_allclose(b.read(0, b.rows)[0], a.read(0, a.rows)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.read(0, b.rows)[1], a.read(0, a.rows)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="collected with target"):
        collect(llama, None, texts, out, spec=CollectSpec(target="embeddings", max_length=24))


@pytest.mark.parametrize("target", ["embeddings", "none"])
def test_a_cap_inside_a_window_stops_there_and_resumes_there(world, llama, tmp_path, target):
    texts = [world["b"]]  # long documents: windows of 24 tokens
    full = tmp_path / "full"
    collect(llama, None, texts, full, spec=CollectSpec(batch_size=2, max_length=24, target=target))
    out = tmp_path / "p"
    for cap in (37, 50, 51):  # 37: inside window 2 of a document; then 13 more, then 1
        r = collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24, target=target,
                                                            max_tokens=cap))
        assert r.tokens_total == cap and not r.complete
    collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24, target=target))
    a, b = PairsStore.open(full), PairsStore.open(out)
    assert a.rows == b.rows and a.provenance["tokens"] == b.provenance["tokens"]
    np.testing.assert_allclose(b.read_x(0, b.rows), a.read_x(0, a.rows), rtol=1e-5, atol=1e-5)
    if target == "embeddings":  # z of a cut window's last row is the embedding of the token after the cut
        np.testing.assert_allclose(b.read(0, b.rows)[1], a.read(0, a.rows)[1], rtol=1e-5, atol=1e-6)


def test_progress_counts_tokens_up_to_the_cap(world, llama, tmp_path):
    seen = []
    collect(llama, None, [world["b"]], tmp_path / "p", spec=CollectSpec(max_length=24, max_tokens=60),
            progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 60) and seen[-1] == (60, 60)
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(seen))
    seen.clear()
    r = collect(llama, None, [world["a"]], tmp_path / "q", spec=CollectSpec(max_length=24, batch_size=2),
                progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, None) and seen[-1] == (r.tokens_total, r.tokens_total)  # the estimate ends exact


def test_interrupted_run_keeps_finished_batches(world, llama, tmp_path):
    texts, spec = [world["a"], world["b"]], CollectSpec(batch_size=2, max_length=24)
    calls = []

    def stop_after_three(done, total):
        calls.append(done)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(llama, None, texts, tmp_path / "p", spec=spec, progress=stop_after_three)
    cut = PairsStore.open(tmp_path / "p")
    assert 0 < cut.rows and cut.provenance["tokens"] == cut.rows  # logits: one pair per token, all committed
    rest = collect(llama, None, texts, tmp_path / "p", spec=spec)
    collect(llama, None, texts, tmp_path / "full", spec=spec)
    a, b = PairsStore.open(tmp_path / "full"), PairsStore.open(tmp_path / "p")
    assert rest.complete and a.rows == b.rows
    np.testing.assert_allclose(b.read(0, b.rows)[0], a.read(0, a.rows)[0], rtol=1e-5, atol=1e-6)


def test_gguf_model_collects_like_its_folder(world, llama, tmp_path):
    gguf_lm = load_model(world["gguf"])
    assert gguf_lm.info["format"] == "gguf"
    collect(gguf_lm, None, [world["a"]], tmp_path / "g", spec=CollectSpec(batch_size=4))
    collect(llama, None, [world["a"]], tmp_path / "f", spec=CollectSpec(batch_size=4))
    g, f = PairsStore.open(tmp_path / "g"), PairsStore.open(tmp_path / "f")
    assert g.rows == f.rows
    for a, b in zip(g.read(0, g.rows), f.read(0, f.rows)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # half-precision GGUF weights: dequantized on load, and z is still x times the stored head
    half = load_model(write_llama_gguf(world["llama"], tmp_path / "half.gguf", tensor_type="f16"))
    w16 = half.model.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(w16, llama.model.lm_head.weight.detach().numpy().astype(np.float16))
    collect(half, None, [world["a"]], tmp_path / "h", spec=CollectSpec(batch_size=4))
    hx, hz = PairsStore.open(tmp_path / "h").read(0, 10**6)
    np.testing.assert_allclose(hz, hx.astype(np.float64) @ w16.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    # a GGUF upper with its folder as lower: the tokenizers agree, so pairs stay per token
    r = collect(world["gguf"], world["llama"], [world["a"]], tmp_path / "gf", spec=CollectSpec(target="embeddings"))
    assert r.tokenizers == "shared" and r.pool == "none"


def test_different_tokenizers_pool_per_document(world, tmp_path):
    result = _run(["collect", "--upper", str(world["llama"]), "--lower", str(world["qwen"]),
                   "--text", str(world["a"]), "-o", str(tmp_path / "p"), "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert "tokenizers differ" in result.stderr and "--pool last" in result.stderr
    report = json.loads(result.stdout)
    assert report["pool"] == "last" and report["pool_switched"] and report["rows_total"] == 9
    store = PairsStore.open(tmp_path / "p")
    qwen = load_model(world["qwen"])
    assert store.d_out == qwen.info["vocab_size"] and store.d_in == 32
    _, _, logits = _reference(qwen, world["docs"][0])
    np.testing.assert_allclose(store.read(0, 1)[1][0], logits[-1], rtol=1e-5, atol=1e-6)
    asked = _run(["collect", "--upper", str(world["llama"]), "--lower", str(world["qwen"]), "--pool", "mean",
                  "--text", str(world["a"]), "-o", str(tmp_path / "m"), "-q"])
    assert asked.exit_code == 0 and "differ" not in asked.stderr


def test_nonfinite_rows(world, tmp_path):
    lm = load_model(world["llama"])
    bad = lm.tokenizer("the")["input_ids"][-1]
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[bad] = float("nan")
    spec = CollectSpec(target="embeddings")
    with pytest.raises(DataError, match="NaN/Inf"):
        collect(lm, None, [world["a"]], tmp_path / "e", spec=spec)
    r = collect(lm, None, [world["a"]], tmp_path / "d", spec=CollectSpec(target="embeddings", on_nonfinite="drop"))
    assert r.nonfinite_rows > 0 and r.rows_total > 0
    assert np.isfinite(PairsStore.open(tmp_path / "d").read(0, r.rows_total)[1]).all()
    zeroed = collect(lm, None, [world["a"]], tmp_path / "z", spec=CollectSpec(target="embeddings", on_nonfinite="zero"))
    assert zeroed.rows_total == r.rows_total + r.nonfinite_rows  # rows kept (zeroed), token alignment kept


@pytest.mark.parametrize("case,kind", [
    ("empty_text", "DataError"), ("missing_text", "SourceError"), ("no_weights", "ModelError"),
    ("missing_model", "SourceError"), ("not_a_model_file", "ModelError"), ("bad_jsonl", "DataError"),
])
def test_bad_inputs_fail_in_one_line(world, tmp_path, case, kind):
    model, text = str(world["llama"]), str(world["a"])
    if case == "empty_text":
        (tmp_path / "e.txt").write_text("\n\n")
        text = str(tmp_path / "e.txt")
    elif case == "missing_text":
        text = str(tmp_path / "nope.txt")
    elif case == "no_weights":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text((world["llama"] / "config.json").read_text())
        model = str(tmp_path / "m")
    elif case == "missing_model":
        model = str(tmp_path / "nomodel")
    elif case == "not_a_model_file":
        model = text
    elif case == "bad_jsonl":
        (tmp_path / "t.jsonl").write_text('{"txt": "no text field"}\n')
        text = str(tmp_path / "t.jsonl")
    result = _run(["collect", "--upper", model, "--text", text, "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    with pytest.raises(getattr(errors, kind)) as raised:  # the library's own error, of this kind ...
        collect(model, None, [text], str(tmp_path / "out2"))
    assert lines == [f"Error: {error_line(raised.value)}"], result.stderr  # ... is the CLI's one line
    assert kind not in lines[0] and "Traceback" not in result.output  # no class name: what is wrong, what to do


def test_target_none_stores_hidden_states_only(world, llama, tmp_path):
    """--target none: x exactly as a direct forward gives it, no z array (a head gate's training data)."""
    out = str(tmp_path / "hidden.zarr")
    res = _run(["collect", "--upper", str(world["llama"]), "--text", str(world["a"]), "--target", "none",
                "-o", out, "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    store = PairsStore.open(out)
    assert store.hidden_only and store.d_out == 0 and "z" not in store.group
    docs = [line for line in open(world["a"]).read().splitlines() if line.strip()]
    want = np.concatenate([_reference(llama, doc)[1][-1] for doc in docs])
    np.testing.assert_allclose(store.read_x(0, store.rows), want, rtol=1e-5, atol=1e-5)


def test_resume_refuses_a_damaged_store_and_keeps_it(world, llama, tmp_path):
    texts = [world["a"], world["b"]]
    out = tmp_path / "p"
    collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24, max_tokens=40))
    chunk = sorted(p for p in (out / "z" / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(chunk.read_bytes()[:-4])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CorruptStoreError, match="damaged .*rows 0..39.*new -o"):
        collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost, nothing added
    collect(llama, None, texts, out, spec=CollectSpec(batch_size=2, max_length=24), overwrite=True)
    assert PairsStore.open(out).damaged_rows() == []


def _no_model_load(monkeypatch):
    """Make loading a model fail the test: what is checked here must be refused before that (slow) step."""
    import importlib

    collect_module = importlib.import_module("prismoe_store.data.collect")  # the module, not its function
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(collect_module, "load_models", load_models)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_output_is_refused_before_the_model_loads(world, tmp_path, monkeypatch, overwrite):
    _no_model_load(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    args = ["collect", "--upper", str(world["llama"]), "--text", str(world["a"]), "-o", str(mine)]
    result = _run(args + (["--overwrite"] if overwrite else []))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        f"Error: {mine} holds a folder of other files, not a pairs store: refusing to replace it "
        "(--overwrite replaces only a pairs store); choose another output"]
    assert "loading" not in result.stderr and [p.name for p in mine.iterdir()] == ["results.md"]
    assert (mine / "results.md").read_text() == "my notes"


def test_a_pairs_store_not_made_by_collect_is_refused_before_the_model_loads(world, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    out = tmp_path / "synth.zarr"
    PairsStore.create(out, d_in=4, d_out=3).append(np.ones((2, 4), np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(DataError, match="not made by collect"):
        collect(str(world["llama"]), None, [world["a"]], out)
    assert PairsStore.open(out).rows == 2


def test_a_cut_jsonl_line_is_refused_before_the_model_loads_and_leaves_nothing(world, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    lines = [json.dumps({"text": doc}) for doc in world["docs"][:5]]
    cut = tmp_path / "trunc.jsonl"
    cut.write_text("\n".join(lines[:4]) + "\n" + lines[4][:9])  # the last line cut inside its string
    out = tmp_path / "c2.zarr"
    result = _run(["collect", "--upper", str(world["llama"]), "--text", str(world["a"]), "--text", str(cut),
                   "-o", str(out)])
    assert result.exit_code == 1 and "loading" not in result.stderr
    with pytest.raises(json.JSONDecodeError) as jerr:
        json.loads(lines[4][:9])
    (line,) = result.stderr.strip().splitlines()
    # the whole json error (what, where: file line and column), not its clipped message
    assert line == (f"Error: {cut}:5: not a JSON object ({jerr.value.msg}: line 5 column {jerr.value.colno}); "
                    "the line is cut short (truncated file?)")
    assert not out.exists()  # no empty store left behind
    # an invalid line in the middle (not cut): named with its line, and nothing is written either
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + '{"text": "a" "b"}\n' + lines[1] + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object \(Expecting ',' delimiter: line 2 column 14\)$"
                       ):
        collect(str(world["llama"]), None, [bad], out)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin.txt:2: not UTF-8 text"):
        collect(str(world["llama"]), None, [latin], out)
    assert not out.exists()


def test_a_truncated_gguf_is_named_as_truncated_before_transformers_reads_it(world, tmp_path):
    whole = world["gguf"].read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(whole[: len(whole) - 4096])
    result = _run(["collect", "--upper", str(trunc), "--text", str(world["a"]), "-o", str(tmp_path / "p"), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot read {trunc} as GGUF: tensor '") and \
        line.endswith("' runs past the end (truncated?)"), line
    assert not (tmp_path / "p").exists()
    with pytest.raises(errors.SourceError, match="truncated"):
        load_model(trunc)


def test_a_resumed_collect_says_where_it_starts(world, tmp_path):
    out = tmp_path / "p.zarr"
    args = ["collect", "--upper", str(world["llama"]), "--text", str(world["a"]), "--max-length", "24", "-o", str(out)]
    first = _run(args + ["--max-tokens", "40"])
    assert first.exit_code == 0 and "resuming" not in first.stderr, first.output
    # a larger cap resumes, and says where from (with --quiet too: it is not progress)
    again = _run(args + ["--max-tokens", "80"])
    assert again.exit_code == 0, again.output
    assert [line for line in again.stderr.splitlines() if line.startswith("resuming")] == [
        f"resuming: {first.stdout.split(' documents (')[0].split()[-1]} of 9 documents collected (40 tokens in "
        "the store)"]
    quiet = _run(args + ["--max-tokens", "120", "--quiet"])
    said = [line for line in quiet.stderr.splitlines() if line.startswith("resuming")]
    assert quiet.exit_code == 0 and len(said) == 1 and said[0].endswith("(80 tokens in the store)"), quiet.output
    assert "resuming" not in quiet.stdout


def test_a_rerun_with_nothing_to_do_stops_before_the_model_loads(world, tmp_path, monkeypatch):
    out = tmp_path / "p.zarr"
    args = ["collect", "--upper", str(world["llama"]), "--text", str(world["a"]), "--max-length", "24", "-o", str(out)]
    assert _run(args + ["--max-tokens", "80"]).exit_code == 0
    _no_model_load(monkeypatch)
    # the cap reached: a no-op, found without loading the model
    res = _run(args + ["--max-tokens", "80"])
    assert res.exit_code == 0 and "loading" not in res.stderr, res.output
    assert res.stdout.startswith(f"{out}: already finished, nothing to do")
    assert "0 pairs added" in res.stdout and "holds 80 pairs" in res.stdout
    # a setting that needs no model is checked before the load too
    res = _run(args + ["--max-tokens", "80", "--layer", "1"])
    assert res.exit_code == 1 and "loading" not in res.stderr
    assert "was collected with layer=2, this run has 1" in res.output, res.output
    res = _run(args + ["--max-tokens", "80", "--target", "embeddings"])
    assert res.exit_code == 1 and "collected with target='logits'" in res.output
    assert PairsStore.open(out).provenance["tokens"] == 80
    monkeypatch.undo()
    # everything collected: the same
    assert _run(args).exit_code == 0
    _no_model_load(monkeypatch)
    res = _run(args + ["--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["already_finished"] is True
    assert json.loads(res.stdout)["complete"] is True
