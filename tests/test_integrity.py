"""Stores never lose, leak or silently corrupt data (issue 12): one test per example of the issue,
and a property test that damages a random chunk of each store kind and runs its consumers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cli.main import main
from prismoe_store.data.extract import extract
from prismoe_store.data.synth import SynthSpec, load_truth, synthesize
from prismoe_store.errors import (
    CorruptStoreError,
    DataError,
    FitError,
    GridError,
    SourceError,
    StoreError,
    StoreFormatError,
)
from prismoe_store.fit import FitConfig, fit
from prismoe_store.gates.settings import GateSettings
from prismoe_store.gates.training import fit_gates
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.inspection.compare import compare_matrices, open_matrix
from prismoe_store.runtime import open_runtime
from prismoe_store.runtime.quant import quantize_adapter
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import StoreOptions, existing_kind, job_lock, location
from prismoe_store.stores.pairs import PairsStore, open_rows
from prismoe_store.stores.weights import WeightsStore

# -- helpers -----------------------------------------------------------------------------------


def cli(*args, cwd=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    return r.exit_code, r.stdout, r.stderr


# The CLI prints what is wrong, not the exception's class (cli/messages.error_line): a library error
# of these kinds exits with 1 and its line holds one of these words.
KIND_WORDS = {"CorruptStoreError": ("chunk", "corrupt", "record"), "SourceError": ("weight_map",),
              "StoreError": ("store",), "GridError": ("tiles", "grid", "workers")}


def one_line(result, *must):
    code, _, err = result
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, result
    for m in must:
        if m in KIND_WORDS:
            assert code == 1 and m not in err and any(w in err for w in KIND_WORDS[m]), result
        else:
            assert m in err, result
    return lines[0]


def victim(d: Path) -> Path:
    v = d / "victim"
    v.mkdir()
    (v / "thesis.txt").write_text("precious")
    return v


def intact(v: Path) -> bool:
    return (v / "thesis.txt").read_text() == "precious"


def safetensors(path: Path, rows=64, cols=32, seed=0) -> np.ndarray:
    from safetensors.numpy import save_file

    w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    save_file({"lm_head.weight": w}, str(path))
    return w


def chunks(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


D_IN, D_OUT = 16, 32  # no grid padding at 4 tiles per pipe, so every chunk is read by the runtime


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One of each store kind, built once; tests copy what they damage."""
    d = tmp_path_factory.mktemp("made")
    pairs = synthesize(str(d / "pairs"), SynthSpec(rows=400, d_in=D_IN, d_out=D_OUT, kind="gated", workers=4),
                       rows_per_chunk=100)
    adapter = fit(pairs, str(d / "adapter"), FitConfig(workers=4), scheduler="synchronous")
    fit_gates(adapter, pairs, GateSettings(sparsity=0.5, epochs=2))
    quantize_adapter(adapter)
    w = safetensors(d / "w.safetensors")
    extract(d / "w.safetensors", d / "weights", workers=8)
    extract(d / "w.safetensors", d / "weights_sharded", workers=8, options=StoreOptions(shard=True))
    np.save(d / "head.npy", np.random.default_rng(3).normal(size=(100, D_IN)).astype(np.float32))
    build_head(str(d / "head.npy"), str(d / "head"), config=HeadConfig(band_rows=16, int8=True))
    np.save(d / "x.npy", pairs.read_x(0, 40))
    return {"dir": d, "w": w}


def copy(made, name: str, to: Path) -> Path:
    shutil.copytree(made["dir"] / name, to / name)
    return to / name


# -- destroying user files -----------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["extract", "tile", "synth"])
def test_empty_output_is_refused_and_the_cwd_kept(tmp_path, cmd):
    v = victim(tmp_path)
    safetensors(v / "good.safetensors")
    np.save(v / "m.npy", np.ones((8, 4), np.float32))
    args = {"extract": ["extract", "good.safetensors"], "tile": ["tile", "m.npy"],
            "synth": ["synth", "--rows", 10, "--d-in", 4, "--d-out", 3]}[cmd]
    one_line(cli(*args, "-o", "", "-q", cwd=v), "StoreError", "non-empty")
    assert intact(v) and sorted(p.name for p in v.iterdir()) == ["good.safetensors", "m.npy", "thesis.txt"]


@pytest.mark.parametrize("cmd", ["extract", "tile", "synth", "fit"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_folder_that_is_no_store_is_refused_not_emptied(tmp_path, made, cmd, overwrite):
    v = victim(tmp_path)
    safetensors(tmp_path / "good.safetensors")
    np.save(tmp_path / "m.npy", np.ones((8, 4), np.float32))
    args = {"extract": ["extract", tmp_path / "good.safetensors", "--workers", 4],
            "tile": ["tile", tmp_path / "m.npy", "--workers", 4],
            "synth": ["synth", "--rows", 10, "--d-in", 4, "--d-out", 3],
            "fit": ["fit", made["dir"] / "pairs", "--workers", 4, "--scheduler", "synchronous"]}[cmd]
    for out in (f"file://{v}", str(v)):
        one_line(cli(*args, "-o", out, "-q", *(["--overwrite"] if overwrite else [])), "not a")
        assert intact(v) and len(list(v.iterdir())) == 1


def test_demo_never_writes_into_a_folder_of_user_files(tmp_path):
    v = victim(tmp_path)
    (v / "results.md").write_text("mine")  # a name the demo also writes
    one_line(cli("demo", "-o", v, "-q"), "not a demo's")
    assert intact(v) and (v / "results.md").read_text() == "mine" and len(list(v.iterdir())) == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_head_into_a_folder_of_user_files_says_what_it_refuses(tmp_path, overwrite):
    v = victim(tmp_path)
    np.save(tmp_path / "w.npy", np.ones((64, 8), np.float32))
    line = one_line(cli("head", tmp_path / "w.npy", "-o", v, "--band-rows", 16, "-q",
                        *(["--overwrite"] if overwrite else [])), "not a")
    assert "pass --overwrite" not in line  # the hint must not name what would be refused next
    assert intact(v) and len(list(v.iterdir())) == 1


def test_overwrite_replaces_only_a_store_of_the_same_kind(tmp_path, made):
    p = copy(made, "pairs", tmp_path)
    safetensors(tmp_path / "good.safetensors")
    one_line(cli("extract", tmp_path / "good.safetensors", "-o", p, "--overwrite", "-q"), "holds a pairs store")
    assert PairsStore.open(p).rows == 400
    with pytest.raises(StoreFormatError):
        AdapterStore.create(p, grids=AdapterStore.open(made["dir"] / "adapter").grids, overwrite=True)
    # a store of the same kind is replaced
    w = copy(made, "weights", tmp_path)
    assert cli("extract", tmp_path / "good.safetensors", "-o", w, "--overwrite", "--workers", 4, "-q")[0] == 0
    assert WeightsStore.open(w).grid("lm_head").workers == 4


def test_cwd_as_file_url_is_refused(tmp_path):
    v = victim(tmp_path)
    safetensors(tmp_path / "good.safetensors")
    one_line(cli("extract", tmp_path / "good.safetensors", "-o", f"file://{v}", "-q", cwd=v))
    assert intact(v)


@pytest.mark.parametrize("cmd", ["extract", "synth"])
def test_file_url_outputs_work(tmp_path, cmd):
    w = safetensors(tmp_path / "good.safetensors")
    url = f"file://{tmp_path / 'new.zarr'}"
    args = ["extract", tmp_path / "good.safetensors"] if cmd == "extract" else ["synth", "--rows", 10, "--d-in", 4,
                                                                                "--d-out", 3]
    assert cli(*args, "-o", url, "-q")[0] == 0
    if cmd == "extract":
        np.testing.assert_array_equal(WeightsStore.open(url).read("lm_head"), w)
    else:
        assert PairsStore.open(url).rows == 10
    assert cli("inspect", url, "--no-stats", "-q")[0] == 0


def test_memory_output_says_it_is_not_kept(tmp_path):
    safetensors(tmp_path / "good.safetensors")
    code, _, err = cli("extract", tmp_path / "good.safetensors", "-o", "memory://issue12-note", "-q")
    assert code == 0 and "in-memory store: it is gone when this command exits" in err


@pytest.mark.parametrize("url,why", [("s3://bucket/x", "not installed"), ("gs://bucket/x", "not installed"),
                                     ("http://example.invalid/x", "read-only"), ("reference://x", "read-only"),
                                     ("bogus://x", "unknown protocol"), ("file://", "names no path")])
def test_odd_output_urls_are_one_line_before_any_write(tmp_path, url, why):
    safetensors(tmp_path / "good.safetensors")
    one_line(cli("extract", tmp_path / "good.safetensors", "-o", url, "-q"), why)
    with pytest.raises(StoreError, match=why):
        location(url, write=True)


# -- reading outside the model folder --------------------------------------------------------------


def _sharded(d: Path, weight_map) -> Path:
    from safetensors.numpy import save_file

    m = d / "model"
    m.mkdir()
    save_file({"model.embed_tokens.weight": np.ones((8, 4), np.float32)}, str(m / "model-00001-of-00001.safetensors"))
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return m


@pytest.mark.parametrize("target", ["abs", "../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, target):
    safetensors(tmp_path / "outside.safetensors")
    target = str(tmp_path / "outside.safetensors") if target == "abs" else target
    m = _sharded(tmp_path, {"model.embed_tokens.weight": "model-00001-of-00001.safetensors", "lm_head.weight": target})
    with pytest.raises(SourceError, match="outside the checkpoint folder"):
        extract(m, tmp_path / "s", tensors=["model.embed_tokens.weight"], workers=2)
    one_line(cli("extract", m, "-o", tmp_path / "s", "-q"), "outside the checkpoint folder")
    assert not (tmp_path / "s").exists()


def test_index_link_leading_out_is_refused(tmp_path):
    safetensors(tmp_path / "outside.safetensors")
    m = _sharded(tmp_path, {"lm_head.weight": "link.safetensors"})
    (m / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    one_line(cli("extract", m, "-o", tmp_path / "s", "-q"), "outside the checkpoint folder")


@pytest.mark.parametrize("weight_map", [["a", "b"], {"lm_head.weight": 3}, {"lm_head.weight": None}])
def test_malformed_weight_map_is_one_line(tmp_path, weight_map):
    m = _sharded(tmp_path, weight_map)
    one_line(cli("extract", m, "-o", tmp_path / "s", "-q"), "SourceError")


# -- missing or wrong chunks are errors, never zeros ----------------------------------------------


@pytest.mark.parametrize("array,int8", [("pipe1/tiles", False), ("pipe2/tiles_int8", True), ("pipe3/scales", True),
                                        ("pipe1/gate_weight", False), ("pipe2/gate_bias", False)])
def test_infer_with_a_deleted_adapter_chunk_fails(tmp_path, made, array, int8):
    a = copy(made, "adapter", tmp_path)
    chunks(a / array)[-1].unlink()
    one_line(cli("infer", a, "--input", made["dir"] / "x.npy", "-o", tmp_path / "y.npy", "-q",
                 *(["--int8"] if int8 else [])), "CorruptStoreError", "missing")
    assert not (tmp_path / "y.npy").exists()


def test_swapped_tile_chunks_are_detected(tmp_path, made):
    a = copy(made, "adapter", tmp_path)
    c = chunks(a / "pipe1" / "tiles")
    first, second = c[0].read_bytes(), c[1].read_bytes()
    assert first != second
    c[0].write_bytes(second)
    c[1].write_bytes(first)
    one_line(cli("infer", a, "--input", made["dir"] / "x.npy", "-o", tmp_path / "y.npy", "-q"),
             "CorruptStoreError", "pipe1/tiles/c/0/0")


def test_fit_with_a_deleted_z_chunk_fails(tmp_path, made):
    p = copy(made, "pairs", tmp_path)
    chunks(p / "z")[1].unlink()
    one_line(cli("fit", p, "-o", tmp_path / "a", "--workers", 4, "--scheduler", "synchronous", "-q"),
             "CorruptStoreError")


def test_compare_with_a_deleted_weights_chunk_fails(tmp_path, made):
    w = copy(made, "weights", tmp_path)
    chunks(w / "tensors" / "lm_head")[2].unlink()
    one_line(cli("compare", w, made["dir"] / "w.safetensors", "-q"), "CorruptStoreError")


def test_truncated_chunk_is_one_line_in_inspect(tmp_path, made):
    a = copy(made, "adapter", tmp_path)
    c = chunks(a / "pipe1" / "tiles")[0]
    c.write_bytes(c.read_bytes()[:7])
    one_line(cli("inspect", a, "-q"), "CorruptStoreError")


def test_nonfinite_stored_gate_fails_loudly(tmp_path, made):
    a = copy(made, "adapter", tmp_path)
    store = AdapterStore.open(a, "r+")
    w, b = store.read_gate(0)
    w[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        store.write_gate(0, w, b)
    np.testing.assert_array_equal(store.read_gate(0)[1], b)  # the stored gate is kept
    store._pipe(0)["gate_weight"][...] = w  # NaN written below the library's checks
    with pytest.raises(CorruptStoreError, match="NaN"):
        AdapterStore.open(a).read_gate(0)
    one_line(cli("infer", a, "--input", made["dir"] / "x.npy", "-o", tmp_path / "y.npy", "-q"), "NaN")


# -- a failed job leaves the store as it was -------------------------------------------------------


def test_failed_fit_gates_restart_keeps_the_trained_gates(tmp_path, made):
    a, p = copy(made, "adapter", tmp_path), copy(made, "pairs", tmp_path)
    before = [AdapterStore.open(a).read_gate(q) for q in range(3)]
    attrs = AdapterStore.open(a).attrs()["gates"]
    store = PairsStore.open(p, "r+")
    x = store.read_x(0, 100)
    x[5, 3] = np.nan
    store.x[0:100] = x
    one_line(cli("fit-gates", a, p, "--restart", "--epochs", 1, "-q"), "NaN")
    after = AdapterStore.open(a)
    for q in range(3):
        for old, new in zip(before[q], after.read_gate(q)):
            np.testing.assert_array_equal(old, new)
    assert after.attrs()["gates"] == attrs
    assert cli("infer", a, "--input", made["dir"] / "x.npy", "-o", tmp_path / "y.npy", "-q")[0] == 0
    assert np.isfinite(np.load(tmp_path / "y.npy")).all()


def test_a_failed_restart_leaves_no_training_state_to_resume(tmp_path, made):
    a, p = copy(made, "adapter", tmp_path), str(made["dir"] / "pairs")
    before = [AdapterStore.open(a).read_gate(q) for q in range(3)]
    calls = {"n": 0}

    def fail_in_training(done, total):  # a library error after the run saved its first state
        calls["n"] += 1
        if calls["n"] > 2:
            raise FitError("diverged")

    with pytest.raises(FitError):
        fit_gates(str(a), p, GateSettings(epochs=3), restart=True, progress=fail_in_training)
    assert calls["n"] > 2
    assert "_gates_training" not in AdapterStore.open(a).group
    for q in range(3):
        for old, new in zip(before[q], AdapterStore.open(a).read_gate(q)):
            np.testing.assert_array_equal(old, new)
    fresh = fit_gates(str(a), p, GateSettings(epochs=1))
    assert fresh["resumed_from"] is None  # a fresh run, not the failed one's state


def test_a_second_writer_fails_clearly(tmp_path):
    safetensors(tmp_path / "good.safetensors")
    out = tmp_path / "s"
    with job_lock(out):  # as if another extract were running
        one_line(cli("extract", tmp_path / "good.safetensors", "-o", out, "--compressor", "none", "-q"),
                 "another job is writing")
    assert not out.exists()


def test_concurrent_extracts_never_mix(tmp_path):
    w = safetensors(tmp_path / "good.safetensors", rows=256, cols=128)
    out = tmp_path / "s"
    code = "from cli.main import main; import sys; main(sys.argv[1:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, "extract", str(tmp_path / "good.safetensors"), "-o",
                               str(out), "--compressor", c, "--workers", "64", "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in ("zstd", "none")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or (len(err.strip().splitlines()) == 1 and "another job is writing" in err), results
    store = WeightsStore.open(out)
    codecs = [c["name"] for c in json.loads((out / "tensors" / "lm_head" / "zarr.json").read_text())["codecs"]]
    assert ("zstd" in codecs) == (store.options.compressor == "zstd")
    np.testing.assert_array_equal(store.read("lm_head"), w)


def test_resumed_extract_repairs_a_torn_chunk(tmp_path):
    w = safetensors(tmp_path / "good.safetensors")
    out = tmp_path / "s"
    extract(tmp_path / "good.safetensors", out, workers=8)
    c = chunks(out / "tensors" / "lm_head")[3]
    c.write_bytes(c.read_bytes()[:-5])
    with pytest.raises(CorruptStoreError):
        WeightsStore.open(out).read("lm_head")
    assert cli("extract", tmp_path / "good.safetensors", "-o", out, "--workers", 8, "-q")[0] == 0
    np.testing.assert_array_equal(WeightsStore.open(out).read("lm_head"), w)


@pytest.mark.parametrize("gone", ["tiles_int8", "scales", "chunk"])
def test_quantize_redoes_removed_int8_data(tmp_path, made, gone):
    a = copy(made, "adapter", tmp_path)
    if gone == "chunk":
        chunks(a / "pipe2" / "tiles_int8")[0].unlink()
    else:
        shutil.rmtree(a / "pipe1" / gone)
    code, out, _ = cli("quantize", a)
    assert code == 0 and "already complete" not in out, out
    assert cli("infer", a, "--input", made["dir"] / "x.npy", "-o", tmp_path / "y.npy", "--int8", "-q")[0] == 0
    assert cli("quantize", a)[1].startswith("INT8 tiles were already complete")


def test_too_many_workers_is_refused_at_once(tmp_path):
    from safetensors.numpy import save_file

    save_file({"lm_head.weight": np.ones((512, 256), np.float32)}, str(tmp_path / "w.safetensors"))
    one_line(cli("extract", tmp_path / "w.safetensors", "-o", tmp_path / "s", "--workers", 1048576, "-q"),
             "GridError", "too many")
    with pytest.raises(GridError):
        extract(tmp_path / "w.safetensors", tmp_path / "s", workers=1 << 20)
    assert not (tmp_path / "s").exists()


# -- one line, with the cause ------------------------------------------------------------------


def test_corrupt_zarr_json_is_one_line(tmp_path, made):
    p = copy(made, "pairs", tmp_path)
    (p / "zarr.json").write_text("{not json")
    one_line(cli("inspect", p, "-q"))
    one_line(cli("fit", p, "-o", tmp_path / "a", "--workers", 4, "-q"))
    assert existing_kind(p) == "unreadable"


def test_infer_into_a_missing_folder_is_one_line(tmp_path, made):
    one_line(cli("infer", made["dir"] / "adapter", "--input", made["dir"] / "x.npy", "-o",
                 tmp_path / "missing" / "y.npy", "-q"), f"the folder {tmp_path / 'missing'} does not exist")


def test_disk_full_during_extract_is_one_line_and_the_rerun_recovers(tmp_path, monkeypatch):
    import zarr.storage

    w = safetensors(tmp_path / "good.safetensors")
    orig, calls = zarr.storage.LocalStore.set, [0]

    async def full(self, key, value):
        calls[0] += 1
        if calls[0] > 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await orig(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    one_line(cli("extract", tmp_path / "good.safetensors", "-o", tmp_path / "s", "--workers", 16, "-q"),
             "No space left on device")
    monkeypatch.setattr(zarr.storage.LocalStore, "set", orig)
    assert cli("extract", tmp_path / "good.safetensors", "-o", tmp_path / "s", "--workers", 16, "-q")[0] == 0
    np.testing.assert_array_equal(WeightsStore.open(tmp_path / "s").read("lm_head"), w)


# -- the property: any damaged chunk of any store kind fails every consumer ------------------------


def _runtime_all(adapter, **kw):
    x = np.load(Path(adapter.url).parent / "x.npy") if (Path(adapter.url).parent / "x.npy").exists() else None
    import torch

    if x is None:
        x = np.random.default_rng(0).normal(size=(8, adapter.d_in)).astype(np.float32)
    with open_runtime(adapter, sparsity=1.0, **kw) as rt:
        rt(torch.from_numpy(x))


def _consumers(kind: str, array: str, d: Path, made) -> dict:
    """The library calls that read ``array`` of a store of ``kind`` (each must fail on a damaged chunk)."""
    if kind.startswith("weights"):
        w = d / KINDS[kind][0]
        return {"read": lambda: WeightsStore.open(w).read("lm_head"),
                "tiles": lambda: [WeightsStore.open(w).read_tile("lm_head", j) for j in range(8)],
                "compare": lambda: compare_matrices(open_matrix(str(w)).array,
                                                    open_matrix(str(made["dir"] / "w.safetensors")).array),
                "head": lambda: build_head(str(w), str(d / "h2"), config=HeadConfig(band_rows=16))}
    if kind in ("adapter fp32", "adapter int8", "gates"):
        a = lambda: AdapterStore.open(d / "adapter", "r+")
        out = {"infer": lambda: _runtime_all(a(), quant="int8" if kind == "adapter int8" else None)}
        if kind == "adapter fp32":
            out["quantize"] = lambda: ([shutil.rmtree(d / "adapter" / f"pipe{q}" / "tiles_int8") for q in (1, 2, 3)],
                                       quantize_adapter(a()))
            out["fit-gates"] = lambda: fit_gates(a(), str(made["dir"] / "pairs"), GateSettings(epochs=1), restart=True)
        return out
    if kind == "pairs":
        out = {"fit": lambda: fit(str(d / "pairs"), str(d / "a2"), FitConfig(workers=4), scheduler="synchronous"),
               "fit-gates": lambda: fit_gates(str(copy(made, "adapter", d)), str(d / "pairs"), GateSettings(epochs=1),
                                              restart=True)}
        if array == "x":  # infer reads a pairs store's x only
            out["infer input"] = lambda: open_rows(str(d / "pairs"))[0](0, 400)
        return out
    h = lambda: AdapterStore.open(d / "head")
    if kind == "head int8":
        return {"infer int8": lambda: _runtime_all(h(), quant="int8")}
    out = {"infer": lambda: _runtime_all(h())}
    if "gate" not in array:  # a head built from a head adapter reads its tiles and order, not its gate
        out["head from it"] = lambda: build_head(str(d / "head"), str(d / "h2"), config=HeadConfig(band_rows=16))
    return out


KINDS = {  # store kind -> (store folder, arrays whose chunks may be damaged)
    "weights": ("weights", ["tensors/lm_head"]),
    "weights (sharded)": ("weights_sharded", ["tensors/lm_head"]),
    "adapter fp32": ("adapter", ["pipe1/tiles", "pipe2/tiles", "pipe3/tiles"]),
    "adapter int8": ("adapter", ["pipe1/tiles_int8", "pipe2/scales", "pipe3/tiles_int8", "pipe3/scales"]),
    "gates": ("adapter", ["pipe1/gate_weight", "pipe2/gate_bias", "pipe3/gate_weight"]),
    "pairs": ("pairs", ["x", "z"]),
    "head fp32": ("head", ["pipe1/tiles", "pipe2/tiles", "pipe3/tiles", "order", "gate_weight", "gate_bias"]),
    "head int8": ("head", ["pipe1/tiles_int8", "pipe2/scales", "pipe1/scales", "order", "gate_weight"]),
}


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(KINDS)), damage=st.sampled_from(["delete", "truncate", "swap"]), data=st.data())
def test_any_damaged_chunk_fails_every_consumer(tmp_path_factory, made, kind, damage, data):
    d = tmp_path_factory.mktemp("damaged")
    folder, arrays = KINDS[kind]
    copy(made, folder, d)
    if folder == "adapter":
        shutil.copy(made["dir"] / "x.npy", d / "x.npy")
    array = data.draw(st.sampled_from([a for a in arrays if (d / folder / a / "c").exists()]), label="array")
    files = chunks(d / folder / array)
    i = data.draw(st.integers(0, len(files) - 1), label="chunk")
    target = files[i]
    raw = target.read_bytes()
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep bytes")])
    else:
        others = [f for f in files if f != target and f.read_bytes() != raw]
        assume(others)
        other = data.draw(st.sampled_from(others), label="swap with")
        target.write_bytes(other.read_bytes())
        other.write_bytes(raw)
    for name, consume in _consumers(kind, array, d, made).items():
        with pytest.raises(CorruptStoreError):
            consume()
            pytest.fail(f"{name} read a damaged {kind} chunk ({damage} {target.relative_to(d)}) without error")


# -- resumed jobs re-verify what they trust ----------------------------------------------------


def test_resumed_synth_rewrites_damaged_rows_bit_for_bit(tmp_path):
    spec = SynthSpec(rows=1000, d_in=D_IN, d_out=D_OUT, kind="gated", workers=4)
    ref = synthesize(str(tmp_path / "ref"), spec, rows_per_chunk=128)
    url = tmp_path / "p"
    synthesize(str(url), spec, rows_per_chunk=128)
    chunks(url / "x")[2].write_bytes(b"")  # a torn chunk of x, a missing chunk of z, a damaged truth
    chunks(url / "z")[5].unlink()
    c = chunks(url / "truth" / "w")[0]
    c.write_bytes(c.read_bytes()[:-3])
    with pytest.raises(CorruptStoreError):
        PairsStore.open(url).read(0, 1000)
    assert list(PairsStore.open(url).damaged_rows()) == [(256, 384), (640, 768)]
    store = synthesize(str(url), spec)  # the re-run repairs, then finds nothing left to add
    assert store.damaged_rows() == []
    for a, b in zip(store.read(0, 1000), ref.read(0, 1000)):
        assert a.tobytes() == b.tobytes()
    assert load_truth(store).w.tobytes() == load_truth(ref).w.tobytes()


@pytest.mark.parametrize("damage", ["tiles", "statistics"])
def test_resumed_fit_redoes_damaged_bands_and_statistics(tmp_path, made, damage):
    pairs = PairsStore.open(made["dir"] / "pairs")
    kw = dict(config=FitConfig(workers=4, block_rows=64, tasks=2, memory_budget=200_000), scheduler="synchronous")
    ref = fit(pairs, tmp_path / "ref", **kw)
    class Stop(Exception):
        pass

    def stop_late(done, total):  # in the solves: the statistics (7 row blocks) and a band finished
        if done > 7:
            raise Stop

    with pytest.raises(Stop):
        fit(pairs, tmp_path / "a", progress=stop_late, **kw)
    part = AdapterStore.open(tmp_path / "a")
    if damage == "tiles":
        done = part.progress("fit_pipe1", part.grids[0].rows).done()
        assert done
        targets = [chunks(tmp_path / "a" / "pipe1" / "tiles")[0]]
    else:  # pipe 1's bands are done: pipe 2 still solves from the sub rows' statistics
        targets = [chunks(tmp_path / "a" / "_fit" / name)[0] for name in ("train_B0", "sub_B0", "sub_G0")]
    for target in targets:
        target.write_bytes(target.read_bytes()[:-7])
    a = fit(pairs, tmp_path / "a", **kw)
    assert a.complete
    for p in range(3):
        assert np.array_equal(a.dense(p), ref.dense(p))
    assert a.attrs()["metrics"] == ref.attrs()["metrics"]

