"""Synthetic pairs: determinism, ground-truth recovery, the gated construction, resuming, the CLI,
flat memory, and the committed sample data."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prismoe_store.data.synth import SynthSpec, generate, load_truth, make_truth, synthesize, truth_summary
from prismoe_store.errors import DataError, StoreError, StoreFormatError
from prismoe_store.gates.routing import route
from prismoe_store.grid import plan_grid, plan_pipes
from prismoe_store.stores.formats import StoreOptions
from prismoe_store.stores.pairs import PairsStore
from prismoe_store.stores.weights import WeightsStore

REPO = Path(__file__).resolve().parents[1]


def _mem_url() -> str:
    return f"memory://test-synth-{uuid.uuid4().hex}"


def _all(store: PairsStore) -> tuple[np.ndarray, np.ndarray]:
    return store.read(0, store.rows)


def _r2(pred: np.ndarray, z: np.ndarray) -> float:
    return float(1 - ((z - pred) ** 2).sum() / ((z - z.mean(0)) ** 2).sum())


def _lstsq(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``W [d_out, d_in]`` minimizing ‖x Wᵀ − z‖ (float64)."""
    return np.linalg.lstsq(x.astype(np.float64), z.astype(np.float64), rcond=None)[0].T


# -- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_same_seed_same_bits_whatever_the_chunking(kind):
    spec = SynthSpec(rows=1500, d_in=24, d_out=40, kind=kind, seed=5, regions=3)
    a = synthesize(_mem_url(), spec, rows_per_chunk=100)
    b = synthesize(_mem_url(), spec, rows_per_chunk=1024, options=StoreOptions(compressor="none"))
    (xa, za), (xb, zb) = _all(a), _all(b)
    assert a.rows == b.rows == 1500 and a.x.chunks[0] == 100 and b.x.chunks[0] == 1024
    assert xa.tobytes() == xb.tobytes() and za.tobytes() == zb.tobytes()
    x, z = generate(spec, make_truth(spec), 333, 777)  # any row range, computed on its own
    assert x.tobytes() == xa[333:777].tobytes() and z.tobytes() == za[333:777].tobytes()
    other = synthesize(_mem_url(), dataclasses.replace(spec, seed=6), rows_per_chunk=100)
    assert not np.array_equal(_all(other)[0], xa)
    t1, t2 = load_truth(a), make_truth(spec)
    for name in ("w", "mix", "gates", "block_region"):
        v1, v2 = getattr(t1, name), getattr(t2, name)
        assert (v1 is None and v2 is None) or v1.tobytes() == v2.tobytes()


def test_resume_after_an_interruption_and_extend(monkeypatch, tmp_path):
    spec = SynthSpec(rows=2000, d_in=16, d_out=20, kind="gated", regions=2)
    whole = _all(synthesize(_mem_url(), spec, rows_per_chunk=256))
    url = str(tmp_path / "pairs")
    calls = {"n": 0}
    append = PairsStore.append

    def crash_on_third(self, x, z, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return append(self, x, z, **kw)

    monkeypatch.setattr(PairsStore, "append", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        synthesize(url, dataclasses.replace(spec, rows=1200), rows_per_chunk=256)
    monkeypatch.setattr(PairsStore, "append", append)
    assert PairsStore.open(url).rows == 512  # two whole chunks committed
    seen = []
    store = synthesize(url, dataclasses.replace(spec, rows=1200), progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (512, 1200) and seen[-1] == (1200, 1200) and store.rows == 1200
    store = synthesize(url, spec)  # a larger --rows extends the same stream
    x, z = _all(store)
    assert x.tobytes() == whole[0].tobytes() and z.tobytes() == whole[1].tobytes()
    assert store.provenance["rows"] == 2000 and store.x.chunks[0] == 256


def test_other_settings_need_overwrite(tmp_path):
    url = str(tmp_path / "pairs")
    synthesize(url, SynthSpec(rows=100, d_in=4, d_out=3))
    with pytest.raises(StoreError, match=r"holds other pairs \(seed=0 \(asked 1\)\).*--overwrite"):
        synthesize(url, SynthSpec(rows=100, d_in=4, d_out=3, seed=1))
    with pytest.raises(StoreError, match="d_in=4 \\(asked 5\\)"):
        synthesize(url, SynthSpec(rows=100, d_in=5, d_out=3))
    assert synthesize(url, SynthSpec(rows=50, d_in=5, d_out=3), overwrite=True).rows == 50
    WeightsStore.create(tmp_path / "weights")
    with pytest.raises(StoreFormatError):
        synthesize(str(tmp_path / "weights"), SynthSpec(rows=10, d_in=4, d_out=3))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="a folder of other files, not a pairs store"):
        synthesize(str(tmp_path / "junk"), SynthSpec(rows=10, d_in=4, d_out=3))


@pytest.mark.parametrize("bad", [dict(rows=0), dict(d_in=-1), dict(kind="cubic"), dict(noise=-0.1),
                                 dict(noise=float("nan")), dict(seed=-1), dict(correlated=-1),
                                 dict(kind="gated", regions=77), dict(workers=0),
                                 dict(workers=3)])
def test_spec_validation(bad):
    with pytest.raises(DataError):
        SynthSpec(**{**dict(rows=10, d_in=8, d_out=300), **bad})


@pytest.mark.parametrize("d_in,d_out,kind,regions", [(1, 1, "linear", 1), (1, 1, "gated", 1), (7, 3, "gated", 4),
                                                     (3, 700, "gated", 2)])
def test_tiny_and_odd_widths(d_in, d_out, kind, regions):
    spec = SynthSpec(rows=300, d_in=d_in, d_out=d_out, kind=kind, noise=0.0, regions=regions)
    store = synthesize(_mem_url(), spec, rows_per_chunk=128)
    x, z = _all(store)
    truth = load_truth(store)
    np.testing.assert_allclose(truth.target(x), z, rtol=0, atol=1e-5)
    for g in plan_pipes(d_in, d_out):
        regions_of = truth.worker_regions(g)
        assert ((regions_of >= 0) == [not g.is_padding(j) for j in range(g.workers)]).all()


# -- ground truth --------------------------------------------------------------------------------


def test_least_squares_recovers_the_linear_truth_to_the_noise_level():
    sigma = 0.05
    spec = SynthSpec(rows=4000, d_in=32, d_out=48, kind="linear", noise=sigma, seed=3)
    store = synthesize(_mem_url(), spec, rows_per_chunk=512)
    x, z = _all(store)
    w = load_truth(store).w.astype(np.float64)
    err2 = float(((_lstsq(x, z) - w) ** 2).sum())
    x64 = x.astype(np.float64)
    expected = sigma**2 * spec.d_out * float(np.trace(np.linalg.inv(x64.T @ x64)))  # E‖Ŵ − W‖² for OLS
    assert 0.85 < err2 / expected < 1.15
    assert abs(float((z - x64 @ w.T).std()) / sigma - 1) < 0.02  # the residual is the noise

    clean = synthesize(_mem_url(), dataclasses.replace(spec, noise=0.0, rows=300))
    xc, zc = _all(clean)
    w_hat = _lstsq(xc, zc)
    assert np.linalg.norm(w_hat - w) / np.linalg.norm(w) < 1e-5


def test_inputs_have_the_documented_distribution():
    spec = SynthSpec(rows=20000, d_in=16, d_out=2, seed=1)
    store = synthesize(_mem_url(), spec, rows_per_chunk=4096)
    x = _all(store)[0].astype(np.float64)
    mix = load_truth(store).mix.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(mix, axis=1), 3.0 * 0.75 ** np.arange(4), rtol=1e-6)
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(cov, np.eye(16) + mix.T @ mix, atol=0.12)


def _reference_gated(truth, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gated target recomputed in float64 from the saved truth, masks expanded independently."""
    x = x.astype(np.float64)
    s = x @ truth.gates.astype(np.float64).T
    region = s.argmax(1)
    d_out, d_in = truth.w.shape
    z = np.zeros((len(x), d_out))
    for e in range(truth.regions):
        mask = np.kron(truth.block_region == e, np.ones(truth.block_shape))[:d_out, :d_in]
        rows = region == e
        z[rows] = x[rows] @ (truth.w * mask).T
    top2 = np.sort(s, axis=1)[:, -2:]
    return z, top2[:, 1] - top2[:, 0]


def test_gated_target_matches_its_definition():
    spec = SynthSpec(rows=3000, d_in=64, d_out=256, kind="gated", noise=0.0, seed=2)
    store = synthesize(_mem_url(), spec, rows_per_chunk=1000)
    x, z = _all(store)
    truth = load_truth(store)
    ref, margin = _reference_gated(truth, x)
    clear = margin > 1e-4  # rows not on a region boundary (float32 vs float64 argmax)
    assert clear.mean() > 0.99
    np.testing.assert_allclose(z[clear], ref[clear], rtol=0, atol=2e-5)

    # each region owns a 1/E share of the blocks, and about a 1/E share of the inputs
    counts = np.bincount(truth.block_region.ravel(), minlength=4)
    assert counts.tolist() == [8, 8, 8, 8] and truth.block_shape == (16, 32)
    share = np.bincount(truth.region(x), minlength=4) / len(x)
    assert (share > 0.5 / 4).all() and (share < 1.5 / 4).all()
    # an input's unowned bands are exactly zero, its owned bands are not
    bo = truth.block_shape[0]
    for e in range(4):
        rows = truth.region(x) == e
        owned_band = np.repeat((truth.block_region == e).any(axis=1), bo)
        assert (z[rows][:, ~owned_band] == 0).all()
        assert (np.abs(z[rows][:, owned_band]).sum(axis=0) > 0).all()


def test_gated_target_is_piecewise_linear():
    spec = SynthSpec(rows=3000, d_in=64, d_out=256, kind="gated", noise=0.01, seed=4)
    x, z = _all(synthesize(_mem_url(), spec, rows_per_chunk=2048))
    truth = make_truth(spec)
    dense = _r2(x @ _lstsq(x, z).T, z)
    region = truth.region(x)
    per_region = [_r2(x[region == e] @ _lstsq(x[region == e], z[region == e]).T, z[region == e]) for e in range(4)]
    assert dense < 0.5  # one matrix cannot fit it ...
    assert min(per_region) > 0.999  # ... one matrix per region can


@pytest.mark.parametrize("pipe", [0, 2])
def test_a_gate_on_the_gating_directions_selects_exactly_the_tiles_needed(pipe):
    spec = SynthSpec(rows=400, d_in=64, d_out=256, kind="gated", noise=0.0, seed=7)
    store = synthesize(_mem_url(), spec)
    x, z = _all(store)
    truth = load_truth(store)
    grid = plan_pipes(64, 256)[pipe]
    owner = truth.worker_regions(grid)
    assert np.bincount(owner, minlength=4).tolist() == [grid.workers // 4] * 4  # every tile in one block

    w_pad = np.zeros(grid.padded_shape, np.float32)
    w_pad[:256, :64] = truth.w
    tiles = w_pad.reshape(grid.rows, grid.tile_out, grid.cols, grid.tile_in)
    xt = torch.from_numpy(x)

    def pipe_output(gate_weight: torch.Tensor) -> np.ndarray:
        r = route(xt, gate_weight, torch.zeros(grid.workers), grid=grid, sparsity=1 / 4)
        dw = r.dense_weights().numpy().reshape(-1, grid.rows, grid.cols)
        xs = x.reshape(-1, grid.cols, grid.tile_in)
        return np.einsum("bcj,rkcj,brc->brk", xs, tiles, dw).reshape(len(x), -1)[:, :256]

    oracle = torch.from_numpy(truth.gates[owner])  # tile j scores x·gates[region(j)]
    y = pipe_output(oracle)
    np.testing.assert_allclose(y, z, rtol=0, atol=1e-4)  # the true tiles, routed right: exact
    untrained = torch.randn(grid.workers, 64, generator=torch.Generator().manual_seed(0)) * 0.01
    y0 = pipe_output(untrained)
    assert np.linalg.norm(y0 - z) / np.linalg.norm(z) > 0.8


def test_worker_regions_refuses_grids_that_straddle_blocks():
    truth = make_truth(SynthSpec(rows=1, d_in=64, d_out=256, kind="gated"))
    with pytest.raises(DataError, match="straddles"):
        truth.worker_regions(plan_grid(64, 256, 4))
    with pytest.raises(DataError, match="grid is"):
        truth.worker_regions(plan_grid(64, 128))


def test_truth_summary_and_missing_truth():
    store = synthesize(_mem_url(), SynthSpec(rows=10, d_in=8, d_out=300, kind="gated", regions=3))
    assert truth_summary(store) == {"kind": "gated", "w": [300, 8], "regions": 3, "block_shape": [8, 4],
                                    "complete": True}
    plain = PairsStore.create(_mem_url(), d_in=2, d_out=2)
    assert truth_summary(plain) is None
    with pytest.raises(StoreError, match="no ground truth"):
        load_truth(plain)


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_synth_and_pairs_info(tmp_path):
    from cli.main import main

    out = str(tmp_path / "pairs")
    runner = CliRunner()
    args = ["synth", "-o", out, "--rows", "700", "--d-in", "8", "--d-out", "300", "--kind", "gated",
            "--regions", "3", "--noise", "0", "--rows-per-chunk", "256", "--json", "-q"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["rows"] == 700 and summary["chunks_x"][0] == 256
    assert summary["provenance"]["kind"] == "gated" and summary["truth"]["regions"] == 3
    x, z = _all(PairsStore.open(out))
    assert np.allclose(load_truth(PairsStore.open(out)).target(x), z, atol=1e-5)

    res = runner.invoke(main, ["pairs-info", out])
    assert res.exit_code == 0 and "700 pairs" in res.output and "ground truth: gated" in res.output
    res = runner.invoke(main, ["synth", "-o", out, "--rows", "700", "--d-in", "8", "--d-out", "300", "--seed", "2"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "holds other pairs" in res.output
    res = runner.invoke(main, ["synth", "-o", out, "--rows", "0", "--d-in", "8", "--d-out", "3"])
    assert res.exit_code == 2  # click's usage error
    res = runner.invoke(main, ["pairs-info", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "no store" in res.output


# -- memory --------------------------------------------------------------------------------------

# The child reports its own peak: VmHWM belongs to the process image exec made, where ru_maxrss
# (self or children) would also count the forking parent's RSS (pytest with torch loaded).
_PEAK = textwrap.dedent("""
    import resource, sys
    from prismoe_store.stores.formats import StoreOptions
    from prismoe_store.data.synth import SynthSpec, synthesize
    spec = SynthSpec(rows=int(sys.argv[2]), d_in=256, d_out=1024, kind="linear")
    synthesize(sys.argv[1], spec, rows_per_chunk=1024, options=StoreOptions(compressor="none"))
    try:
        print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])  # KiB
    except OSError:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_rows(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    peaks = {}
    for rows in (10_000, 40_000):  # 49 MiB and 195 MiB of pairs; one chunk is 5 MiB
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / f"p{rows}"), str(rows)], env=env,
                             capture_output=True, text=True, check=True).stdout
        peaks[rows] = int(out.split()[-1]) / 1024  # MiB
    store_mb = 40_000 * (256 + 1024) * 4 / 2**20
    print(f"peak RSS: {peaks[10_000]:.0f} MiB at 10k rows, {peaks[40_000]:.0f} MiB at 40k rows ({store_mb:.0f} MiB)")
    assert peaks[40_000] < 1.15 * peaks[10_000] + 16
    assert peaks[40_000] - peaks[10_000] < store_mb / 8
    assert peaks[40_000] < store_mb  # the pairs never sit in memory whole


# -- sample data ---------------------------------------------------------------------------------


def _load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "sample_data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_data_matches_a_regeneration(tmp_path):
    sample = _load_make_sample()
    committed = PairsStore.open(sample.PATH)
    assert (committed.rows, committed.d_in, committed.d_out) == (3072, 64, 256)
    prov = committed.provenance
    assert SynthSpec(**{f.name: prov[f.name] for f in dataclasses.fields(SynthSpec)}) == sample.SPEC
    fresh = PairsStore.open(sample.make(tmp_path / "again"))
    for a, b in zip(_all(committed), _all(fresh)):
        assert a.tobytes() == b.tobytes()
    assert load_truth(committed).w.tobytes() == load_truth(fresh).w.tobytes()
    assert not (sample.PATH / ".append.lock").exists()
    files = [p for p in sample.PATH.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
