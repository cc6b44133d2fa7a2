"""`prismoe benchmark runtime` on a fitted and on a head adapter: every measurement present, the
ratios consistent with the times they come from, the dense matrix the adapter stands for."""

import json

import numpy as np
from click.testing import CliRunner

from cli.main import main
from prismoe_store.bench.runtime import benchmark_runtime, format_report, synthetic_adapter
from prismoe_store.head.build import HeadConfig, build_head


def test_benchmark_of_a_fitted_adapter(tmp_path):
    a = synthetic_adapter(str(tmp_path / "a.zarr"), d_in=32, d_out=64, workers=8)
    r = benchmark_runtime(a, repeats=1, batch=4, hit_tokens=3, budgets=(0.25, 1.0))
    assert r["kind"] == "fitted" and r["sparsity"] == 0.3  # gates that record no ρ: the runtime default
    assert set(r["baselines"]) == {"dense", "offload", "host"}
    assert r["baselines"]["dense"]["latency_vs_dense"] == 1.0
    s = r["fp32"]
    assert np.isclose(s["latency_vs_dense"], s["latency_s"] / s["dense_latency_s"])
    # one repeat: the spread of the per-repeat ratios collapses onto the ratio itself
    assert np.allclose(s["latency_vs_dense_quartiles"], [s["latency_vs_dense"]] * 2)
    assert np.allclose(s["throughput_vs_dense_quartiles"], [s["throughput_vs_dense"]] * 2)
    int8 = sum(g.active_count * (g.tile_out * g.tile_in + 4 * g.tile_out) for g in a.grids)
    fp32 = sum(g.active_count * 4 * g.tile_out * g.tile_in for g in a.grids)
    assert np.isclose(r["int8"]["bytes_vs_fp32"], int8 / fp32) and 0 < r["int8"]["rel_error_vs_fp32"] < 0.02
    assert [c["share"] for c in r["hit_rate"]] == [0.25, 1.0]
    small, full = r["hit_rate"]
    assert full["hit_rate"] >= small["hit_rate"] and full["bytes_loaded_per_token"] <= small["bytes_loaded_per_token"]
    assert r["hit_rate"][0]["peak_bytes"] <= r["hit_rate"][0]["budget_bytes"]
    assert r["schedules"]["serial"]["peak_bytes"] < r["schedules"]["parallel"]["peak_bytes"]
    assert r["hit_tokens"] == 3 and "budget sweep over a trace of 6 tokens" in format_report(r)


def test_benchmark_command_on_a_head_with_hidden_rows(tmp_path):
    w = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=16, int8=True))
    np.save(tmp_path / "x.npy", np.random.default_rng(2).standard_normal((20, 16)).astype(np.float32))
    res = CliRunner().invoke(main, ["benchmark", "runtime", str(tmp_path / "h.zarr"), str(tmp_path / "x.npy"),
                                    "--repeats", "1", "--batch", "8", "--hit-tokens", "4", "--json", "-q",
                                    "--markdown", str(tmp_path / "r.md"), "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["kind"] == "head" and r["sparsity"] == 0.1 and r["schedules"] is None
    assert 0.05 < r["fp32"]["row_share"] <= 0.15
    assert r["int8"] is not None
    assert (tmp_path / "plots" / "hit_rate.png").stat().st_size > 0
    assert "| dense | 1.00× (1.00–1.00) | 1.00× (1.00–1.00) |" in (tmp_path / "r.md").read_text()
    assert len(r["load"]) == 2 and all(v >= 0 for v in r["load"])  # the machine's load, before and after
    res = CliRunner().invoke(main, ["benchmark", "runtime", str(tmp_path / "h.zarr"), str(tmp_path / "x.npy"),
                                    "--repeats", "1", "--batch", "8", "--hit-tokens", "4", "-q"])
    assert res.exit_code == 0 and "machine load (1-minute average)" in res.output, res.output
    assert "middle half of the repeats" in res.output


def test_benchmark_refuses_rows_of_another_width(tmp_path):
    w = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=16))
    np.save(tmp_path / "x.npy", np.ones((10, 100), np.float32))
    res = CliRunner().invoke(main, ["benchmark", "runtime", str(tmp_path / "h.zarr"), str(tmp_path / "x.npy"), "-q"])
    assert res.exit_code == 1 and "100 wide" in res.output and "16" in res.output

