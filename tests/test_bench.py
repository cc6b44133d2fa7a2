"""``prismoe benchmark adapter``: every quality number against a numpy float64 reference on the same
held-out rows, the SVD baseline's bytes against the adapter's, INT8 within a bound, and the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from prismoe_store.bench.adapter import (
    BenchConfig,
    active_bytes,
    benchmark_adapter,
    mark_pareto,
)
from prismoe_store.bench.adapter_report import format_markdown
from prismoe_store.bench.svd import svd_rank
from prismoe_store.data.synth import SynthSpec, synthesize
from prismoe_store.errors import DataError
from prismoe_store.fit import FitConfig, fit
from prismoe_store.runtime.dense import dense_matrix
from prismoe_store.runtime.quant import quantize_adapter
from prismoe_store.stores.pairs import PairsStore, holdout_mask

FAST = dict(repeats=1, hit_tokens=3, budgets=(0.25, 1.0), svd_points=4, batch=16)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Gated synthetic pairs 16 → 48, an adapter of 8 workers a pipe (no gates), with INT8 tiles."""
    d = tmp_path_factory.mktemp("bench")
    spec = SynthSpec(rows=1200, d_in=16, d_out=48, kind="gated", regions=2, workers=8, noise=0.05)
    pairs = synthesize(str(d / "pairs.zarr"), spec, rows_per_chunk=256)
    adapter = fit(pairs, str(d / "adapter.zarr"), FitConfig(workers=8), scheduler="synchronous")
    quantize_adapter(adapter)
    return pairs, adapter


def _heldout(pairs: PairsStore, holdout=0.1, seed=0):
    x, z = pairs.read(0, pairs.rows)
    keep = holdout_mask(seed, 0, pairs.rows, holdout)
    return x[keep].astype(np.float64), z[keep].astype(np.float64)


def _ref(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    sse = float(((y - z) ** 2).sum())
    return float(np.sqrt(sse / (z ** 2).sum())), 1.0 - sse / float(((z - z.mean(0)) ** 2).sum())


def test_quality_matches_float64_references(stores):
    pairs, adapter = stores
    r = benchmark_adapter(adapter, pairs, sparsities=(0.5, 1.0), **FAST)
    x, z = _heldout(pairs)
    assert r["heldout"]["rows"] == len(x) and r["heldout"]["logits"] is False
    rows = {(row["method"], row["sparsity"], row["quant"], row["schedule"]): row for row in r["rows"]}
    assert len(r["rows"]) == 1 + 2 + 2 * 2 * 2

    # dense: Σ α_p W_p against a float64 product, and against the fit's own held-out metric
    w = sum(a * adapter.dense(p).astype(np.float64) for p, a in enumerate(adapter.alphas))
    np.testing.assert_allclose(dense_matrix(adapter), w, rtol=1e-6, atol=1e-6)
    err, r2 = _ref(x @ w.T, z)
    d = rows[("dense", None, "fp32", None)]
    assert d["rel_err"] == pytest.approx(err, abs=1e-6) and d["r2"] == pytest.approx(r2, abs=1e-6)
    assert d["rel_err"] == pytest.approx(adapter.attrs()["metrics"]["combined"]["rel_err"], abs=1e-6)
    assert d["active_bytes"] == 4 * 16 * 48 and d["top1"] is None and d["kl"] is None

    # the adapter at ρ = 1 with its (uniform) gate is the dense matrix, parallel or serial
    for schedule in ("parallel", "serial"):
        assert rows[("adapter", 1.0, "fp32", schedule)]["rel_err"] == pytest.approx(d["rel_err"], abs=1e-5)
    assert r["checks"]["uniform_rho1_vs_dense_rel_err_diff"] < 1e-6
    assert r["checks"]["serial_vs_parallel_max_rel_diff"] < 1e-5

    # INT8: per-row absmax rounding moves the outputs by well under 1 %
    i8 = rows[("adapter", 1.0, "int8", "parallel")]
    assert 0 < i8["output_vs_fp32"] < 1e-2
    assert abs(i8["rel_err"] - d["rel_err"]) < 1e-2
    assert i8["active_bytes"] == sum(g.active_count * (g.tile_out * g.tile_in + 4 * g.tile_out) for g in adapter.grids)
    assert rows[("adapter", 1.0, "fp32", "parallel")]["active_bytes"] == sum(
        g.active_count * 4 * g.tile_out * g.tile_in for g in adapter.grids)

    # SVD: a rank-r truncation of the dense matrix (numpy SVD), no more bytes than the adapter moves
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    for rho in (0.5, 1.0):
        row = rows[("svd", rho, "fp32", None)]
        budget = active_bytes(adapter.grids, rho)
        rank = row["rank"]
        assert rank == svd_rank(budget, 16, 48)
        assert row["active_bytes"] == 4 * rank * (16 + 48) <= budget or rank == 1
        assert rank == 16 or budget - row["active_bytes"] < 4 * (16 + 48)
        wr = (u[:, :rank] * s[:rank]) @ vt[:rank]
        assert row["rel_err"] == pytest.approx(_ref(x @ wr.T, z)[0], abs=1e-5)
    curve = r["svd_curve"]
    assert curve[-1]["rank"] == 16 and curve[-1]["rel_err"] == pytest.approx(d["rel_err"], abs=1e-5)

    # speed and cache columns are measured ratios and counts
    for row in r["rows"]:
        assert row["latency_vs_dense"] > 0 and row["throughput_vs_dense"] > 0
        if row["method"] == "adapter":
            assert 0 < row["peak_cache_bytes"] and 0.0 <= row["hit_rate"] <= 1.0
    par = rows[("adapter", 1.0, "fp32", "parallel")]
    ser = rows[("adapter", 1.0, "fp32", "serial")]
    assert ser["peak_cache_bytes"] < par["peak_cache_bytes"]  # serial holds one pipe's tiles at a time
    assert par["hit_rate"] == 1.0  # warm, every tile resident
    # a uniform gate picks the same tiles for every token: a full budget hits every time once warm
    full = [c for c in r["hit_rate"] if c["share"] == 1.0]
    assert full and all(c["hit_rate"] == 1.0 for c in full)


def test_logits_add_top1_and_kl(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((900, 12)).astype(np.float32)
    w = rng.standard_normal((20, 12)).astype(np.float32)
    z = (x @ w.T + 0.5 * rng.standard_normal((900, 20))).astype(np.float32)
    p = PairsStore.create(str(tmp_path / "p.zarr"), d_in=12, d_out=20,
                          provenance={"kind": "collected", "settings": {"target": "logits"}})
    p.append(x, z)
    a = fit(p, str(tmp_path / "a.zarr"), FitConfig(workers=4), scheduler="synchronous")
    small = dict(FAST, sparsities=(1.0,), quants=("fp32",), schedules=("parallel",), hit_sparsities=())
    r = benchmark_adapter(a, p, **small)
    assert r["heldout"]["logits"] is True and r["heldout"]["logits_from"] == "provenance"
    d = r["rows"][0]
    xh, zh = _heldout(p)
    y = xh @ dense_matrix(a).astype(np.float64).T

    def log_softmax(v):
        v = v - v.max(1, keepdims=True)
        return v - np.log(np.exp(v).sum(1, keepdims=True))

    lz, ly = log_softmax(zh), log_softmax(y)
    assert d["top1"] == pytest.approx(float((y.argmax(1) == zh.argmax(1)).mean()))
    assert d["kl"] == pytest.approx(float((np.exp(lz) * (lz - ly)).sum(1).mean()), rel=1e-4)
    assert "| top-1 | KL |" in format_markdown(r)
    off = benchmark_adapter(a, p, logits=False, **small)
    assert off["rows"][0]["top1"] is None and "top-1" not in format_markdown(off)


def test_cli_writes_json_markdown_and_plots(stores, tmp_path):
    pairs, adapter = stores
    md, plots = tmp_path / "out" / "results.md", tmp_path / "plots"
    res = CliRunner().invoke(main, ["benchmark", "adapter", adapter.url, pairs.url, "--sparsities", "0.3,1",
                                    "--repeats", "1", "--hit-tokens", "2", "--max-rows", "64", "--batch", "8",
                                    "--threads", "1", "--markdown", str(md), "--plots", str(plots), "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["heldout"]["rows"] == 64 and report["threads"] == 1
    text = md.read_text()
    assert text.startswith("## Benchmark") and "| dense F.linear" in text and "adapter ρ=0.3 int8 serial" in text
    assert text.count("\n|") >= 2 + 1 + 2 + 8
    for name in ("quality_vs_bytes.png", "hit_rate.png", "latency.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    res = CliRunner().invoke(main, ["benchmark", "adapter", adapter.url, pairs.url, "--sparsities", "0,1"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_bad_input_is_one_clear_error(stores, tmp_path):
    pairs, adapter = stores
    with pytest.raises(DataError, match="sparsity"):
        BenchConfig(sparsities=(1.5,))
    with pytest.raises(DataError, match="quants"):
        BenchConfig(quants=("int4",))
    other = PairsStore.create(str(tmp_path / "o.zarr"), d_in=5, d_out=48)
    with pytest.raises(DataError, match="5→48"):
        benchmark_adapter(adapter, other, **FAST)
    with pytest.raises(DataError, match="either"):
        benchmark_adapter(adapter, pairs, BenchConfig(), repeats=1)


def test_pareto_marks_the_non_dominated_rows():
    rows = [{"active_bytes": b, "rel_err": e} for b, e in ((100, 0.5), (50, 0.6), (60, 0.7), (200, 0.5), (10, 0.9))]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, False, True]
