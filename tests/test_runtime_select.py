"""The select runtime of head adapters: exact selected logits, −inf elsewhere, any cache budget,
mass-adaptive K, the embedding module, and CUDA when there is one."""

import numpy as np
import pytest
import torch

from prismoe_store.errors import CacheError, DataError
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.head.generate import PrisMoEEmbedding, PrisMoEHead
from prismoe_store.runtime import open_runtime
from prismoe_store.runtime.bands import BandRouter
from prismoe_store.stores.adapter import AdapterStore


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    d = tmp_path_factory.mktemp("head")
    w = np.random.default_rng(0).standard_normal((250, 16)).astype(np.float32)
    np.save(d / "w.npy", w)
    build_head(str(d / "w.npy"), str(d / "h.zarr"), config=HeadConfig(band_rows=16, int8=True))
    return AdapterStore.open(str(d / "h.zarr")), w


def _x(n=9, d=16, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("tokens", [1, 2, 9])  # 1, 2: fused per-pair products; 9: one product over the union
@pytest.mark.parametrize("budget_bands", [1, 3, 7, 16])
def test_selected_logits_are_exact_and_the_rest_never_win(head, budget_bands, tokens):
    adapter, w = head
    x = _x(tokens)
    ref = x.double() @ torch.from_numpy(w).double().T  # [B, 250]
    with open_runtime(adapter, sparsity=0.3, cache_bytes=budget_bands * 16 * 16 * 4) as rt:
        got = rt(x)
        chosen = rt.router.chosen(x)  # [B, n]
        assert rt.stats()["cache"]["peak_bytes"] <= budget_bands * 16 * 16 * 4
    band_of_token = rt.position // 16
    keep = chosen[:, band_of_token]  # [B, 250] token computed for that row
    assert keep.sum(dim=1).tolist() == [int((keep[i]).sum()) for i in range(tokens)]
    torch.testing.assert_close(got[keep].double(), ref[keep], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(got[~keep]).all()
    # −inf never wins: the argmax is always a computed token, and the softmax puts no mass elsewhere
    assert keep[torch.arange(tokens), got.argmax(dim=1)].all()
    assert float(torch.softmax(got, dim=1)[~keep].sum()) == 0.0


@pytest.mark.parametrize("budget_bands", [1, 2, 16])
def test_rho_1_equals_the_dense_product_at_every_budget(head, budget_bands):
    adapter, w = head
    for tokens in (1, 2, 4):  # the fused and the union paths both give way to W's own layout at ρ = 1
        x = _x(tokens)
        with open_runtime(adapter, sparsity=1.0, cache_bytes=budget_bands * 16 * 16 * 4) as rt:
            got = rt(x)
        torch.testing.assert_close(got.double(), x.double() @ torch.from_numpy(w).double().T, rtol=1e-5, atol=1e-5)
        if budget_bands == 16:  # every band resident: the dense product itself, bit for bit (with part of
            assert torch.equal(got, x @ torch.from_numpy(w).T)  # them, a BLAS may split a group differently)


def test_an_eviction_inside_a_call_never_overwrites_a_band_it_uses(head):
    adapter, w = head
    x = _x(32)
    with open_runtime(adapter, sparsity=0.5, cache_bytes=2 * 16 * 16 * 4) as rt:  # 2 slots, ~8 bands a call
        got = rt(x)
        s = rt.stats()["cache"]
    assert s["evictions"] > 0 and s["slots"] == 2
    keep = rt.router.chosen(x)[:, rt.position // 16]
    torch.testing.assert_close(got[keep], (x @ torch.from_numpy(w).T)[keep], rtol=1e-5, atol=1e-5)
    pool = rt.pool
    pool.acquire(np.array([0, 1]))
    with pytest.raises(CacheError, match="do not fit"):
        pool.acquire(np.array([2]))  # both slots pinned by this call
    pool.release()


def test_mass_threshold_takes_fewest_bands_reaching_it(head):
    adapter, _ = head
    x = _x(50)
    with open_runtime(adapter, mass=0.9) as rt:
        rt(x)
        bands, valid = rt.route(x)
        p = torch.softmax(torch.addmm(rt.router.bias, x, rt.router.weight.T), dim=1)
        taken = torch.gather(p, 1, bands) * valid
        k = valid.sum(dim=1)
        reached = taken.sum(dim=1) >= 0.9 - 1e-6
        capped = k == rt.router.k_max
        assert (reached | capped).all()
        # one band fewer would not reach it
        short = (taken.sum(dim=1) - torch.gather(p, 1, bands)[torch.arange(50), k - 1]) < 0.9
        assert (short | (k == 1)).all()
        assert rt.stats()["bands_per_token"] == pytest.approx(float(k.float().mean()))


def test_router_edge_cases():
    gate = (np.eye(4, dtype=np.float32), np.zeros(4, np.float32))
    assert BandRouter(gate, sparsity=0.01).k_max == 1
    bands, valid = BandRouter(gate, sparsity=1.0)(torch.tensor([[0.0, 0.0, 3.0, 1.0]]))
    assert bands[0, :2].tolist() == [2, 3] and valid.all()


def test_int8_runtime_close_to_fp32(head):
    adapter, w = head
    x = _x(5)
    with open_runtime(adapter, sparsity=1.0, quant="int8") as rt:
        got = rt(x)
    ref = x @ torch.from_numpy(w).T
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_embedding_gathers_rows_through_the_shared_pool(head):
    adapter, w = head
    rt = open_runtime(adapter, cache_bytes=4 * 16 * 16 * 4)
    emb, lm = PrisMoEEmbedding(rt), PrisMoEHead(rt)
    ids = torch.tensor([[3, 249, 0, 3], [100, 101, 7, 200]])
    assert torch.equal(emb(ids), torch.from_numpy(w)[ids])
    assert lm(_x(2)).shape == (2, 250)
    assert rt.stats()["cache"]["hits"] + rt.stats()["cache"]["misses"] > 0
    with pytest.raises(DataError):
        emb(torch.tensor([250]))
    rt.close()


def test_bad_inputs(head):
    adapter, _ = head
    with open_runtime(adapter) as rt:
        with pytest.raises(DataError, match="input must be"):
            rt(torch.ones(3, 5))
        with pytest.raises(DataError, match="NaN"):
            rt(torch.full((1, 16), float("nan")))
    with pytest.raises(DataError, match="mass"):
        open_runtime(adapter, mass=1.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(head):
    adapter, w = head
    x = _x(6)
    with open_runtime(adapter, sparsity=0.3) as cpu, open_runtime(adapter, sparsity=0.3, device="cuda",
                                                                  cache_bytes=3 * 16 * 16 * 4) as gpu:
        a, b = cpu(x), gpu(x).cpu()
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    torch.testing.assert_close(a[~torch.isneginf(a)], b[~torch.isneginf(b)], rtol=1e-4, atol=1e-4)
