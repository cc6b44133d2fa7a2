"""`prismoe benchmark head`: the metrics against references computed here from the dense head."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prismoe_store.bench.head import benchmark_head, format_head_report, plot_head
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.stores.adapter import AdapterStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hb")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 12)).astype(np.float32)
    h = (2 * rng.standard_normal((400, 12))).astype(np.float32)
    np.save(d / "w.npy", w)
    np.save(d / "h.npy", h)
    build_head(str(d / "w.npy"), str(d / "a.zarr"), config=HeadConfig(band_rows=16))
    return d, AdapterStore.open(str(d / "a.zarr")), w, h


def test_metrics_match_a_dense_reference(setup):
    d, adapter, w, h = setup
    r = benchmark_head(adapter, str(d / "h.npy"), sparsities=(0.25, 1.0), masses=(0.9,), batch=64)
    full = next(s for s in r["settings"] if s["setting"] == "rho=1")
    assert full["top1"] == 1.0 and full["top5_recall"] == 1.0
    assert full["mass"] == pytest.approx(1.0, abs=1e-5) and full["kl"] == pytest.approx(0.0, abs=1e-4)
    assert full["row_share"] == pytest.approx(1.0)
    # ρ = 0.25 by hand: the runtime's routing, the dense softmax
    part = next(s for s in r["settings"] if s["setting"] == "rho=0.25")
    from prismoe_store.runtime import open_runtime

    with open_runtime(adapter, sparsity=0.25) as rt:
        x = torch.from_numpy(h)
        sparse = rt(x).double()
    p = torch.softmax(x.double() @ torch.from_numpy(w).double().T, dim=1)
    kept = torch.isfinite(sparse)
    mass = (p * kept).sum(dim=1)
    assert part["mass"] == pytest.approx(float(mass.mean()), rel=1e-4)
    assert part["kl"] == pytest.approx(float(-mass.log().mean()), rel=1e-3)
    top1 = float((sparse.argmax(dim=1) == p.argmax(dim=1)).double().mean())
    assert part["top1"] == pytest.approx(top1)
    top5 = torch.topk(p, 5, dim=1).indices
    assert part["top5_recall"] == pytest.approx(float(torch.gather(kept, 1, top5).double().mean()))
    assert part["row_share"] == pytest.approx(float(kept.double().mean()))
    assert part["bytes_ratio"] == pytest.approx(part["row_share"] + (19 * 13 * 4) / (300 * 12 * 4))
    # baselines: contiguous ids with centroid gate, truncated SVD of the same bytes
    assert len(r["contiguous"]) == 2 and r["svd"][1]["rank"] >= r["svd"][0]["rank"] >= 1
    # the SVD rows against numpy's SVD of the head: its rank-r logits' top-1 and its energy share
    u, sv, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    p64 = p.numpy()
    for row in r["svd"]:
        k = row["rank"]
        approx = h.astype(np.float64) @ ((u[:, :k] * sv[:k]) @ vt[:k]).T
        assert row["top1"] == pytest.approx(float(np.mean(approx.argmax(1) == p64.argmax(1))), abs=1.5 / len(h))
        assert row["energy"] == pytest.approx(float((sv[:k] ** 2).sum() / (sv ** 2).sum()), rel=1e-9)
    assert r["svd_first_energy"] == pytest.approx(float(sv[0] ** 2 / (sv ** 2).sum()), rel=1e-9)
    mean = w.astype(np.float64).mean(0)
    assert r["svd_first_vs_mean"] == pytest.approx(float(abs(vt[0] @ mean) / np.linalg.norm(mean)), abs=1e-9)
    assert "The first direction alone holds" in format_head_report(r)
    assert "| rho=0.25 |" in format_head_report(r)


def test_benchmark_head_command(setup, tmp_path):
    from cli.main import main

    d, adapter, w, h = setup
    res = CliRunner().invoke(main, ["benchmark", "head", str(d / "a.zarr"), str(d / "h.npy"), "--sparsities", "0.1,0.3",
                                    "--masses", "0.95", "--markdown", str(tmp_path / "r.md"), "--plots",
                                    str(tmp_path / "plots"), "--json", "--max-rows", "100"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["rows"] == 100 and len(info["settings"]) == 3
    assert (tmp_path / "plots" / "head_top1.png").stat().st_size > 0
    assert "top-1 agreement" in (tmp_path / "r.md").read_text()
    assert plot_head(info, tmp_path / "again.png").endswith("again.png")


def test_int8_top1_is_against_the_float32_head(tmp_path):
    """With INT8 tiles the reference stays the float32 head: top-1 agreement is the INT8 sparse
    head's argmax against the float32 argmax, so the quantization error counts (even at ρ = 1)."""
    from prismoe_store.runtime import open_runtime

    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 12)).astype(np.float32)
    w[:, 0] *= 40  # one large column: INT8's per-row scale blurs the others, ties break differently
    h = rng.standard_normal((400, 12)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "h.npy", h)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "a.zarr"), config=HeadConfig(band_rows=16, int8=True))
    adapter = AdapterStore.open(str(tmp_path / "a.zarr"))
    r = benchmark_head(adapter, str(tmp_path / "h.npy"), sparsities=(0.25, 1.0), masses=(), batch=64, quant="int8",
                       baselines=False)
    ref = (torch.from_numpy(h).double() @ torch.from_numpy(w).double().T).argmax(dim=1)
    for rho in (0.25, 1.0):
        with open_runtime(adapter, sparsity=rho, quant="int8") as rt:
            got = rt(torch.from_numpy(h)).argmax(dim=1)
        want = float((got == ref).double().mean())
        row = next(s for s in r["settings"] if s["setting"] == f"rho={rho:g}")
        assert row["top1"] == pytest.approx(want)
    assert next(s for s in r["settings"] if s["setting"] == "rho=1")["top1"] < 1.0  # INT8 changed some winners
