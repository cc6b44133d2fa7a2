"""How well a head adapter keeps the full head's output (``prismoe benchmark head``).

Over held-out hidden states ``x`` the reference is the full head, ``z = x Wᵀ`` (all bands, exact),
and its softmax ``p``. For each routing setting — a fixed share ρ of bands per token, or a mass
threshold ``m`` — the runtime's own :meth:`~prismoe_store.runtime.bands.SelectRuntime.route`
picks each token's bands ``S`` and (DESIGN §7):

- **top-1 agreement**: the full head's argmax lies in ``S`` (then the sparse argmax is the same
  token: selected logits are exact, the rest −inf). With ``quant="int8"`` the sparse head's logits
  are the INT8 tiles' (the reference stays the float32 head), and top-1 agreement is whether the
  argmax of the INT8 logits over ``S`` is the full float32 head's argmax: it counts the INT8
  error too (the other measures are the routing's, from the reference);
- **top-5 recall**: share of the full head's top-5 tokens in ``S``;
- **mass kept** ``M = Σ_{v∈S} p_v``; **KL** of the sparse distribution to the full one,
  ``KL(q ‖ p) = −log M`` (``q = p/M`` on ``S``);
- **share of rows computed**, and **bytes read per token** (the selected bands' bytes plus the
  gate's) against the dense head's ``V · d · 4``.

Baselines on the same rows: bands of **contiguous token ids** with a centroid gate at the same
ρ (what the vocabulary order buys), and a **truncated SVD** ``W ≈ U_r Σ_r V_rᵀ`` whose bytes
``r (V + d) · 4`` equal the bytes a token reads at each ρ (top-1 agreement, top-5 recall and
``KL(p ‖ p_svd)``; it has no mass to keep).

>>> SPARSITIES[:3], MASSES
((0.02, 0.05, 0.1), (0.9, 0.95, 0.99))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prismoe_store.runtime.bands import DEFAULT_MASS_CAP, BandRouter, SelectRuntime
from prismoe_store.runtime.grouped import RuntimeConfig
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import open_rows

SPARSITIES = (0.02, 0.05, 0.1, 0.2, 0.3)
MASSES = (0.9, 0.95, 0.99)
ProgressFn = Callable[[int, int], None]


@dataclass
class _Sums:
    """Running sums of the per-token metrics of one setting."""

    top1: float = 0.0
    top5: float = 0.0
    mass: float = 0.0
    kl: float = 0.0
    rows: float = 0.0
    tokens: int = 0

    def result(self, name: str, value: float, V: int, row_bytes: float, gate_bytes: int, dense_bytes: int) -> dict:
        n = max(1, self.tokens)
        share = self.rows / n / V
        per_token = share * V * row_bytes + gate_bytes
        return {"setting": name, "value": value, "top1": self.top1 / n, "top5_recall": self.top5 / n,
                "mass": self.mass / n, "kl": self.kl / n, "row_share": share,
                "bytes_per_token": per_token, "bytes_ratio": per_token / dense_bytes}


def benchmark_head(adapter: AdapterStore, hidden, *, sparsities: Sequence[float] = SPARSITIES,
                   masses: Sequence[float] = MASSES, mass_cap: float | None = None, max_rows: int = 20000,
                   baselines: bool = True, batch: int = 256, quant: str | None = None,
                   progress: ProgressFn | None = None) -> dict:
    """Quality of ``adapter``'s routing over the hidden states ``hidden`` (see the module docstring).

    ``hidden``: a pairs store or ``.npy`` of held-out hidden states (at most ``max_rows`` used).
    Returns ``{"rows", "V", "d", "bands", "band_rows", "settings": [...], "contiguous": [...],
    "svd": [...]}``; each setting row has ``top1``, ``top5_recall``, ``mass``, ``kl``,
    ``row_share``, ``bytes_per_token``, ``bytes_ratio``.
    """
    rows_of, S = open_rows(hidden, adapter.d_in, max_rows)
    V, d = adapter.d_out, adapter.d_in
    full = SelectRuntime(adapter, RuntimeConfig(sparsity=1.0))  # the reference: the float32 head, every band
    quantized = SelectRuntime(adapter, RuntimeConfig(sparsity=1.0, quant="int8")) if quant == "int8" else None
    a, n = full.band_rows, full.n_bands
    row_bytes = d * (1 if quant == "int8" else 4) + (4 if quant == "int8" else 0)
    gate_bytes, dense_bytes = 4 * n * (d + 1), 4 * V * d
    gate = adapter.read_band_gate()
    assert gate is not None, "SelectRuntime above refuses a head adapter without a band gate"
    routers = {f"rho={r:g}": (r, BandRouter(gate, sparsity=r)) for r in sparsities}
    cap = mass_cap if mass_cap is not None else DEFAULT_MASS_CAP
    routers.update({f"mass={m:g}": (m, BandRouter(gate, sparsity=cap, mass=m)) for m in masses})
    sums = {name: _Sums() for name in routers}
    position = full.position  # token -> adapter row
    tok_band = position // a  # [V] band of each token

    main_rows = full.band_sizes.float()  # [n] rows per band
    contiguous = svd = None
    if baselines:  # both baselines from one read of the head, in token order
        head = _head_in_token_order(adapter)  # [V, d]
        contiguous, svd = _ContiguousGate(head, a), _TruncatedSVD(head)
        contiguous_band = torch.arange(V) // a  # [V] contiguous band of each token
        contiguous_rows = _rows_per_band(a, contiguous.n, V)
        del head
    ranks = {r: max(1, int(r * V * row_bytes + gate_bytes) // (4 * (V + d))) for r in sparsities}
    c_sums = {r: _Sums() for r in sparsities}
    s_sums = {r: _Sums() for r in sparsities}

    with torch.no_grad():
        for start in range(0, S, batch):
            x = torch.from_numpy(rows_of(start, min(S, start + batch)))  # [B, d]
            z = full(x)  # [B, V] token order, exact
            z8 = quantized(x) if quantized is not None else None  # [B, V] the INT8 tiles' logits
            logp = torch.log_softmax(z, dim=1)  # [B, V]
            top5 = torch.topk(z, 5, dim=1).indices  # [B, 5]
            band_logp = _band_sum(logp, tok_band, n)  # [B, n] log band mass
            for name, (_, router) in routers.items():
                chosen = router.chosen(x)  # [B, n]
                _accumulate(sums[name], chosen, band_logp, tok_band, top5, rows_per_band=main_rows, sparse=z8)
            if contiguous is not None:
                c_logp = _band_sum(logp, contiguous_band, contiguous.n)
                for r in sparsities:
                    _accumulate(c_sums[r], contiguous.choose(x, r), c_logp, contiguous_band, top5,
                                rows_per_band=contiguous_rows)
            if svd is not None:
                for r, k in ranks.items():
                    _accumulate_svd(s_sums[r], svd.logits(x, k), logp, top5)
            if progress:
                progress(min(S, start + batch), S)
    full.close()
    if quantized is not None:
        quantized.close()
    result: dict[str, Any] = {"rows": S, "V": V, "d": d, "bands": n, "band_rows": a, "quant": quant or "fp32",
              "settings": [sums[name].result(name, value, V, row_bytes, gate_bytes, dense_bytes)
                           for name, (value, _) in routers.items()]}
    if contiguous is not None:
        result["contiguous"] = [c_sums[r].result(f"rho={r:g}", r, V, row_bytes, gate_bytes, dense_bytes)
                                for r in sparsities]
    if svd is not None:
        result["svd"] = [{"setting": f"rho={r:g}", "rank": ranks[r], "energy": float(svd.energy[min(ranks[r], d) - 1]),
                          **{key: getattr(s_sums[r], key) / max(1, s_sums[r].tokens) for key in ("top1", "top5", "kl")},
                          "bytes_ratio": ranks[r] * (V + d) * 4 / dense_bytes} for r in sparsities]
        result["svd_first_energy"] = float(svd.energy[0])  # σ₁² / Σ σ²
        result["svd_first_vs_mean"] = svd.first_vs_mean  # |cos| of the first direction with the rows' mean
        for row in result["svd"]:
            row["top5_recall"] = row.pop("top5")
    return result


def _rows_per_band(a: int, n: int, V: int) -> torch.Tensor:
    rows = torch.full((n,), float(a))
    rows[-1] = V - a * (n - 1)
    return rows


def _band_sum(logp: torch.Tensor, band: torch.Tensor, n: int) -> torch.Tensor:
    """``log Σ_{v∈b} p_v`` per band ``[B, n]`` from token log-probabilities ``[B, V]``."""
    m = logp.max(dim=1, keepdim=True).values
    mass = torch.zeros(logp.shape[0], n).index_add_(1, band, (logp - m).exp())
    return mass.log() + m


def _accumulate(s: _Sums, chosen, band_logp, tok_band, top5, *, rows_per_band, sparse=None) -> None:
    """Add a batch's measures; ``sparse`` (``[B, V]``, optional): the logits the sparse head computes
    (INT8 tiles), whose argmax over the chosen bands must be the reference's top token."""
    B = chosen.shape[0]
    if sparse is None:  # exact logits: the top token survives exactly when its band is chosen
        s.top1 += float(chosen[torch.arange(B), tok_band[top5[:, 0]]].sum())
    else:
        pred = torch.where(chosen[:, tok_band], sparse, float("-inf")).argmax(dim=1)  # [B]
        s.top1 += float((pred == top5[:, 0]).sum())
    s.top5 += float(torch.gather(chosen, 1, tok_band[top5]).float().mean(dim=1).sum())
    mass = (band_logp.exp() * chosen).sum(dim=1).clamp_max(1.0)  # [B]
    s.mass += float(mass.sum())
    s.kl += float(-mass.clamp_min(1e-30).log().sum())
    s.rows += float((chosen.float() @ rows_per_band).sum())
    s.tokens += B


def _accumulate_svd(s: _Sums, approx: torch.Tensor, logp: torch.Tensor, top5: torch.Tensor) -> None:
    B = approx.shape[0]
    a5 = torch.topk(approx, 5, dim=1).indices
    s.top1 += float((a5[:, 0] == top5[:, 0]).sum())
    s.top5 += float((a5[:, :, None] == top5[:, None, :]).any(dim=1).float().mean(dim=1).sum())
    q = torch.log_softmax(approx, dim=1)
    s.kl += float((logp.exp() * (logp - q)).sum())
    s.tokens += B


def _head_in_token_order(adapter: AdapterStore) -> np.ndarray:
    """The head ``[V, d]`` float32 in token order, each band read once (the baselines need all of it)."""
    order, a = adapter.read_order(), adapter.band_rows
    head = np.empty((adapter.d_out, adapter.d_in), np.float32)
    for b in range(adapter.n_bands):
        w = adapter.read_band_tiles(b)
        head[order[b * a:b * a + len(w)]] = w
    return head


class _ContiguousGate:
    """The baseline grouping: bands of contiguous token ids, scored by their centroids
    (``x · mean w_v + log |b|``), top ``ceil(ρ·n)`` per token."""

    def __init__(self, head: np.ndarray, a: int):
        V = head.shape[0]
        self.n = -(-V // a)
        band = np.arange(V) // a
        weight = np.zeros((self.n, head.shape[1]))
        np.add.at(weight, band, head)
        counts = np.bincount(band, minlength=self.n).astype(np.float64)
        self.weight = torch.from_numpy((weight / counts[:, None]).astype(np.float32))  # [n, d]
        self.bias = torch.from_numpy(np.log(counts).astype(np.float32))  # [n]

    def choose(self, x: torch.Tensor, rho: float) -> torch.Tensor:
        k = max(1, math.ceil(rho * self.n))
        sel = torch.topk(torch.addmm(self.bias, x, self.weight.T), k, dim=1).indices
        return torch.zeros(len(x), self.n, dtype=torch.bool).scatter_(1, sel, True)


class _TruncatedSVD:
    """``W ≈ U_r Σ_r V_rᵀ`` from the Gram matrix ``WᵀW`` (float64)."""

    def __init__(self, head: np.ndarray):
        gram = head.T.astype(np.float64) @ head.astype(np.float64)  # [d, d]
        evals, evecs = np.linalg.eigh(gram)
        sq = np.maximum(evals[::-1], 0.0)  # σ², descending
        self.energy = np.cumsum(sq) / max(float(sq.sum()), 1e-300)  # [d] Σ_{i≤r} σ²_i / Σ σ², rank r = index + 1
        mean = head.mean(axis=0, dtype=np.float64)  # [d] the rows' common mean
        top = evecs[:, -1]  # [d] the first right singular vector
        self.first_vs_mean = float(abs(top @ mean) / max(float(np.linalg.norm(mean)), 1e-300))  # |cos|
        self.right = torch.from_numpy(evecs[:, ::-1].copy().astype(np.float32))  # [d, d] V, by singular value
        self.left = torch.from_numpy(head) @ self.right  # [V, d] U Σ = W V, token order

    def logits(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        return (x @ self.right[:, :rank]) @ self.left[:, :rank].T  # [B, V]


def format_head_report(r: dict) -> str:
    """Markdown tables of :func:`benchmark_head`'s result."""
    note = (" Top-1 agreement is the INT8 sparse head's argmax against the float32 head's (it counts the INT8 "
            "error); top-5 recall, mass kept and KL are the routing's, from the float32 logits."
            if r["quant"] == "int8" else "")
    lines = [f"Head {r['V']} × {r['d']}, {r['bands']} bands of {r['band_rows']} rows, {r['quant']}, "
             f"{r['rows']} held-out rows.{note}", "",
             "| routing | top-1 agreement | top-5 recall | mass kept | KL | rows computed | bytes/token ÷ dense (gate "
             "included) |",
             "|---|---|---|---|---|---|---|"]
    for s in r["settings"]:
        lines.append(f"| {s['setting']} | {s['top1']:.4f} | {s['top5_recall']:.4f} | {s['mass']:.4f} | "
                     f"{s['kl']:.4f} | {s['row_share']:.4f} | {s['bytes_ratio']:.4f} |")
    if "contiguous" in r:
        lines += ["", "Baseline: contiguous token ids, centroid gate.", "",
                  "| routing | top-1 agreement | top-5 recall | mass kept | rows computed |", "|---|---|---|---|---|"]
        for s in r["contiguous"]:
            lines.append(f"| {s['setting']} | {s['top1']:.4f} | {s['top5_recall']:.4f} | {s['mass']:.4f} | "
                         f"{s['row_share']:.4f} |")
    if "svd" in r:
        first = ""
        if "svd_first_energy" in r:
            first = f" The first direction alone holds {r['svd_first_energy']:.3f} of the energy"
            cos = r.get("svd_first_vs_mean", 0.0)
            first += (f"; it is the rows' common mean (|cos| {cos:.2f}), which moves every logit alike and ranks "
                      "no token." if cos >= 0.9 else ".")
        lines += ["", "Baseline: truncated SVD W ≈ U_r Σ_r V_rᵀ, its rank r the largest whose bytes r·(V + d)·4 fit "
                  "in the routing setting's bytes per token; energy kept Σ_{i≤r} σ²_i / Σ σ²." + first, "",
                  "| bytes of routing | rank | bytes ÷ dense | energy kept | top-1 agreement | top-5 recall "
                  "| KL(p ‖ p_svd) |", "|---|---|---|---|---|---|---|"]
        for s in r["svd"]:
            energy = f"{s['energy']:.3f}" if "energy" in s else "–"  # reports written before energy was recorded
            lines.append(f"| {s['setting']} | {s['rank']} | {s['bytes_ratio']:.3f} | {energy} | {s['top1']:.4f} | "
                         f"{s['top5_recall']:.4f} | {s['kl']:.4f} |")
    return "\n".join(lines)


def plot_head(r: dict, path) -> str:
    """PNG: top-1 agreement against the share of rows computed, for each routing and baseline."""
    from prismoe_store.plots import figure

    fig = figure(6, 4)
    ax = fig.add_subplot()
    fixed = [s for s in r["settings"] if s["setting"].startswith("rho")]
    adaptive = [s for s in r["settings"] if s["setting"].startswith("mass")]
    ax.plot([s["row_share"] for s in fixed], [s["top1"] for s in fixed], "o-",
            label="clustered bands, trained gate (ρ)")
    if adaptive:
        ax.plot([s["row_share"] for s in adaptive], [s["top1"] for s in adaptive], "s", label="mass threshold m")
    if "contiguous" in r:
        ax.plot([s["row_share"] for s in r["contiguous"]], [s["top1"] for s in r["contiguous"]], "^--",
                label="contiguous ids, centroid gate")
    if "svd" in r:
        ax.plot([s["bytes_ratio"] for s in r["svd"]], [s["top1"] for s in r["svd"]], "x:",
                label="truncated SVD (share = bytes ratio)")
    ax.set_xlabel("share of the head's rows computed per token")
    ax.set_ylabel("top-1 agreement with the full head")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"head {r['V']}×{r['d']}: {r['rows']} held-out rows")
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)
