"""``prismoe train`` and ``prismoe demo``: stages run once, are skipped when done and resumed when
interrupted (judged from the stores, checked by the stores' own records and files); the demo's
report on a tiny synthetic store has its keys and sane values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import corpus_lines, save_llama, write_texts

from cli.main import main
from prismoe_store.data.collect import CollectSpec
from prismoe_store.data.synth import SynthSpec, synthesize
from prismoe_store.demo import demo, format_demo
from prismoe_store.errors import DataError, StoreError
from prismoe_store.head.demo import HeadDemoConfig, HeadSample
from prismoe_store.pipeline import TrainConfig, default_pairs_path, format_train, train
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore

pytest.importorskip("transformers")

SMALL = dict(workers=8, epochs=2, scheduler="synchronous")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_llama(d / "llama"), write_texts(d / "docs.txt", corpus_lines(40, seed=4))


@pytest.fixture
def synth_pairs(tmp_path):
    spec = SynthSpec(rows=700, d_in=16, d_out=32, kind="gated", regions=2, workers=8)
    return synthesize(str(tmp_path / "pairs.zarr"), spec, rows_per_chunk=256).url


def _mtimes(folder) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def test_train_from_models_runs_every_stage_then_skips_them(llama, tmp_path):
    model, text = llama
    out = str(tmp_path / "head.zarr")
    args = ["train", "--upper", str(model), "--text", str(text), "-o", out, "--workers", "8", "--epochs", "2",
            "--scheduler", "synchronous", "--int8", "--json", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    first = json.loads(res.output)
    assert [s["status"] for s in first["stages"]] == ["ran", "ran", "ran", "ran"]
    pairs = PairsStore.open(default_pairs_path(out))
    a = AdapterStore.open(out)
    assert pairs.rows > 100 and pairs.provenance["settings"]["target"] == "logits"
    assert (a.d_in, a.d_out) == (pairs.d_in, pairs.d_out) == (32, 300)
    assert a.complete and a.attrs()["gates"]["complete"] and a.attrs()["int8"]["complete"]
    assert a.attrs()["fit"]["pairs"]["rows"] == pairs.rows

    before = {**_mtimes(out), **_mtimes(pairs.url)}
    res = CliRunner().invoke(main, args[:-2])  # again, text summary
    assert res.exit_code == 0, res.output
    assert res.stdout.count(": skipped (") == 4 and "0 stage(s) run, 4 skipped" in res.stdout
    assert {**_mtimes(out), **_mtimes(pairs.url)} == before  # nothing was rewritten


def test_collect_resumes_and_a_grown_store_is_refitted(llama, tmp_path):
    model, text = llama
    out = str(tmp_path / "a.zarr")
    cfg = TrainConfig(collect=CollectSpec(max_tokens=150), **SMALL)
    r1 = train(model, None, [text], out, config=cfg)
    rows1 = PairsStore.open(default_pairs_path(out)).rows
    assert r1.stage("collect").status == "ran" and r1.stage("fit").status == "ran"
    assert train(model, None, [text], out, config=cfg).stage("collect").status == "skipped"  # the cap is reached

    r2 = train(model, None, [text], out, config=TrainConfig(collect=CollectSpec(max_tokens=300), **SMALL))
    rows2 = PairsStore.open(default_pairs_path(out)).rows
    assert rows2 > rows1
    assert r2.stage("collect").status == "resumed" and r2.stage("collect").detail["rows_added"] == rows2 - rows1
    assert r2.stage("fit").status == "ran" and "grew" in r2.stage("fit").detail["reason"]
    assert AdapterStore.open(out).attrs()["fit"]["pairs"]["rows"] == rows2
    assert r2.stage("gates").status == "ran"


class _Interrupt(Exception):
    pass


def test_interrupted_gate_training_resumes(synth_pairs, tmp_path):
    out = str(tmp_path / "a.zarr")
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, int8=True)
    from contextlib import contextmanager

    @contextmanager
    def stop_in_gates(stage):
        def tick(done, total):
            if stage == "gates" and done > total / 2:  # in epoch 2 of 3: epoch 1 is saved
                raise _Interrupt
        yield tick

    with pytest.raises(_Interrupt):
        train(None, None, None, out, pairs=synth_pairs, config=cfg, progress=stop_in_gates)
    a = AdapterStore.open(out)
    assert a.complete and not a.attrs()["gates"]["complete"]
    r = train(None, None, None, out, pairs=synth_pairs, config=cfg)
    assert [s.status for s in r.stages] == ["skipped", "skipped", "resumed", "ran"]
    assert r.stage("gates").detail["epochs_run"] == 3
    # other gate settings restart the training (the tiles stay)
    r = train(None, None, None, out, pairs=synth_pairs, config=TrainConfig(**{**SMALL, "epochs": 1}, sparsity=0.5))
    assert [s.status for s in r.stages] == ["skipped", "skipped", "ran", "off"]
    assert AdapterStore.open(out).attrs()["gates"]["settings"]["sparsity"] == 0.5
    assert "train → " in format_train(r)


def test_refuses_what_it_cannot_resume(synth_pairs, tmp_path):
    out = str(tmp_path / "a.zarr")
    with pytest.raises(DataError, match="no pairs store"):
        train(None, None, None, out, pairs=str(tmp_path / "missing.zarr"))
    with pytest.raises(DataError, match="different stores"):
        train(None, None, None, synth_pairs, pairs=synth_pairs)
    train(None, None, None, out, pairs=synth_pairs, config=TrainConfig(**SMALL))
    with pytest.raises(StoreError, match="--overwrite"):
        train(None, None, None, out, pairs=synth_pairs, config=TrainConfig(**{**SMALL, "mode": "independent"}))
    r = train(None, None, None, out, pairs=synth_pairs, config=TrainConfig(**{**SMALL, "mode": "independent"}),
              overwrite=True)
    assert r.stage("fit").status == "ran" and AdapterStore.open(out).mode == "independent"
    res = CliRunner().invoke(main, ["train", "--upper", "m", "-o", out])
    assert res.exit_code == 2 and "--text" in res.output


def test_sample_pairs_are_regenerated_when_missing(tmp_path, monkeypatch):
    import prismoe_store.demo as pipeline_demo

    url, how = pipeline_demo.sample_pairs(tmp_path)
    assert how.startswith("committed") and PairsStore.open(url).rows == 3072
    monkeypatch.setattr(pipeline_demo, "SAMPLE_DIR", tmp_path / "nowhere")
    url2, how2 = pipeline_demo.sample_pairs(tmp_path)
    assert how2.startswith("regenerated") and url2 != url
    a, b = PairsStore.open(url), PairsStore.open(url2)
    assert a.rows == b.rows and a.rows_per_chunk == b.rows_per_chunk
    xa, za = a.read(2000, 2100)
    xb, zb = b.read(2000, 2100)
    assert np.array_equal(xa, xb) and np.array_equal(za, zb)  # the same pairs, bit for bit


@pytest.fixture
def head_sample(tmp_path):
    """A small head with structure (rows in 8 directions) and hidden states near those directions."""
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((8, 16)).astype(np.float32)
    w = (centers[rng.integers(0, 8, 512)] + 0.3 * rng.standard_normal((512, 16))).astype(np.float32)
    x = (2 * centers[rng.integers(0, 8, 700)] + 0.5 * rng.standard_normal((700, 16))).astype(np.float16)
    paths = {n: str(tmp_path / f"{n}.npy") for n in ("head", "train", "held")}
    np.save(paths["head"], w)
    np.save(paths["train"], x[:500])
    np.save(paths["held"], x[500:])
    return HeadSample(paths["head"], paths["train"], paths["held"], label="a test head"), w


def test_demo_like_run_reports_sane_values(synth_pairs, head_sample, tmp_path):
    out = tmp_path / "demo"
    fast = {"repeats": 1, "hit_tokens": 3, "budgets": (0.25, 1.0), "batch": 16, "svd_points": 4}
    sample, w = head_sample
    head_cfg = HeadDemoConfig(epochs=2, repeats=1, cache_tokens=8, batch=16)
    res = demo(out, pairs=synth_pairs, workers=8, epochs=2, bench_options=fast, head_sample=sample,
               head_config=head_cfg)
    assert sorted(res) == ["benchmark", "files", "head", "out", "pairs", "pairs_from", "seconds", "takeaway", "train"]
    h = res["head"]
    x = np.load(sample.held).astype(np.float32)
    assert h["runtime"]["rows"] == len(x) == h["quality"]["rows"]
    # the runtime's own top-1 against the dense product equals the routing score at the same ρ (selected
    # logits are exact), and both are better than chance yet counted over every held-out row
    at = {s["setting"]: s for s in h["quality"]["settings"]}[f"rho={head_cfg.sparsity:g}"]
    assert h["runtime"]["top1_same"] == round(at["top1"] * len(x))
    assert 0.5 < h["runtime"]["top1_agreement"] <= 1
    assert h["bytes"]["dense_fp32"] == w.nbytes and h["bytes"]["per_token_vs_dense"] < 0.5
    assert h["runtime"]["latency_vs_dense"] > 0 and h["runtime"]["cache"]["misses"] > 0
    assert os.path.getsize(h["plot"]) > 5000 and h["plot"] in res["files"]["plots"]
    assert [s["status"] for s in res["train"]["stages"]] == ["skipped", "ran", "ran", "ran"]
    b = res["benchmark"]
    assert b["gates"]["trained"] and b["gates"]["sparsity"] == 0.3 and b["quants"] == ["fp32", "int8"]
    rows = {(r["method"], r["sparsity"], r["quant"], r["schedule"]): r for r in b["rows"]}
    dense = rows[("dense", None, "fp32", None)]
    assert dense["rel_err"] == pytest.approx(AdapterStore.open(out / "adapter.zarr").attrs()["metrics"]["combined"]
                                             ["rel_err"], abs=1e-6)
    assert b["checks"]["uniform_rho1_vs_dense_rel_err_diff"] < 1e-5  # the runtime's exactness at ρ = 1
    for rho in (0.1, 0.3, 0.5, 1.0):
        f32, i8 = rows[("adapter", rho, "fp32", "parallel")], rows[("adapter", rho, "int8", "parallel")]
        assert 0 < f32["rel_err"] < 1.5 and -1 < f32["r2"] <= 1
        assert i8["output_vs_fp32"] < 2e-2 and abs(i8["rel_err"] - f32["rel_err"]) < 2e-2
        assert rows[("adapter", rho, "fp32", "serial")]["rel_err"] == f32["rel_err"]
    assert rows[("adapter", 0.1, "fp32", "parallel")]["active_bytes"] < rows[("adapter", 1.0, "fp32", "parallel")][
        "active_bytes"]
    assert [c["sparsity"] for c in b["hit_rate"]] == [0.3, 0.3]
    assert Path(res["files"]["results"]).read_text().startswith("## Benchmark")
    assert json.loads(Path(res["files"]["json"]).read_text())["rows"]
    assert all(os.path.getsize(p) > 5000 for p in res["files"]["plots"])
    text = format_demo(res)
    for word in ("1. A real head as a sparse adapter: a test head", "2. A fitted adapter", "quality on",
                 "memory at ρ = 0.3", "speed at ρ = 0.3", "cache hit rate", "wrote", "\n\nTakeaway: "):
        assert word in text
    assert f"{h['runtime']['top1_agreement']:.1%} of held-out tokens" in res["takeaway"]
    again = demo(out, pairs=synth_pairs, workers=8, epochs=2, bench_options=fast, head_sample=sample,
                 head_config=head_cfg)
    assert [s["status"] for s in again["train"]["stages"]] == ["skipped"] * 4
    assert again["head"]["build"]["status"] == "skipped"
    assert again["head"]["runtime"]["top1_same"] == h["runtime"]["top1_same"]
    assert np.isfinite(again["benchmark"]["rows"][0]["rel_err"])
