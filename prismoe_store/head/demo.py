"""The demo's main part: a real model's head as a sparse adapter, next to the dense head.

``prismoe demo`` runs this on ``sample_data/smollm2`` (see ``sample_data/README.md``): rows
0 … 8191 of SmolLM2-135M-Instruct's tied output head (Q8_0 blocks copied from the model's GGUF)
and the model's own final hidden states on Python standard-library docstrings — 3072 from the
train half of the modules, 1024 from the held-out half. It

1. builds the head adapter from the GGUF (:func:`~prismoe_store.head.build.build_head`: band
   tiles, the vocabulary clustered in the hidden states' metric, the centroid gate, INT8 tiles);
2. trains the band gate briefly on the train rows (:func:`~prismoe_store.head.band_gate.fit_band_gate`);
3. scores the routing on the held-out rows (:func:`~prismoe_store.bench.head.benchmark_head`);
4. runs the sparse runtime and the dense head (``F.linear`` with the matrix read straight from the
   GGUF) on the same held-out rows: the top-1 token of each, compared, and their speed as ratios
   timed in the same run, with the tile cache holding a quarter of the bands.

>>> HeadDemoConfig(sparsity=0).sparsity
Traceback (most recent call last):
...
prismoe_store.errors.DataError: sparsity must be in (0, 1], got 0
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from prismoe_store.errors import DataError, StoreError
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.records import GatesRecord

ProgressFn = Callable[[int, int], None]
StageProgress = Callable[[str], AbstractContextManager[ProgressFn | None]]
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data" / "smollm2"


@dataclass(frozen=True)
class HeadSample:
    """Where the demo's real head and hidden states are."""

    gguf: str  # the head slice (a GGUF holding token_embd.weight, the tied head)
    train: str  # hidden states [S, d] (.npy or a pairs store) for the vocabulary order and the gate
    held: str  # held-out hidden states the demo measures on
    label: str = "a head"  # what the head is, for the report

    @classmethod
    def committed(cls) -> HeadSample:
        """The files in ``sample_data/smollm2`` (:class:`DataError` when one is missing)."""
        sample = cls(str(SAMPLE_DIR / "head.gguf"), str(SAMPLE_DIR / "train_hidden.npy"),
                     str(SAMPLE_DIR / "held_hidden.npy"),
                     label="SmolLM2-135M-Instruct's output head, token ids 0-8191 of 49152 (Q8_0 blocks from the "
                           "model's GGUF)")
        missing = [p for p in (sample.gguf, sample.train, sample.held) if not Path(p).is_file()]
        if missing:
            raise DataError(f"the demo's sample is missing {', '.join(missing)}: restore sample_data/ from the "
                            "repository (or regenerate it with scripts/make_smol_sample.py)")
        return sample


@dataclass(frozen=True)
class HeadDemoConfig:
    """Settings of the head part of the demo (kept small so the demo runs in about a minute)."""

    sparsity: float = 0.2  # ρ: share of bands a token computes (the slice has 128 bands; 0.1 is also measured)
    iterations: int = 2  # balanced k-means rounds of the vocabulary order (the default 6 gains little here)
    epochs: int = 3  # gate-training epochs
    batch: int = 64  # rows per call when timing throughput
    repeats: int = 3  # interleaved timing repeats (medians)
    cache_share: float = 0.25  # the small-cache run: the tile cache holds this share of the bands' bytes
    cache_tokens: int = 128  # held-out rows run one at a time through the small cache

    def __post_init__(self) -> None:
        if not 0 < self.sparsity <= 1:
            raise DataError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if not 0 < self.cache_share <= 1:
            raise DataError(f"cache_share must be in (0, 1], got {self.cache_share}")
        for name in ("iterations", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise DataError(f"epochs must be >= 0, got {self.epochs}")


def run_head_demo(out_dir, sample: HeadSample | None = None, config: HeadDemoConfig = HeadDemoConfig(), *,
                  progress: StageProgress | None = None) -> dict:
    """Build, train, score and time the sample head's adapter in ``out_dir`` (module docstring).

    Re-running into the same folder reuses a finished adapter with trained gates. Returns a
    JSON-ready dict: ``build``, ``gate``, ``quality`` (:func:`benchmark_head`'s result),
    ``runtime`` (measured top-1 agreement and speed of the sparse runtime against the dense
    head), ``bytes`` and ``plot``.
    """
    from prismoe_store.bench.head import benchmark_head, plot_head
    from prismoe_store.head.band_gate import BandGateConfig, fit_band_gate
    from prismoe_store.head.build import HeadConfig, build_head
    from prismoe_store.head.vocab_order import OrderConfig
    from prismoe_store.inspection.compare import open_matrix

    sample = sample or HeadSample.committed()
    progress = progress or (lambda stage: nullcontext(None))
    out = Path(out_dir)
    url = str(out / "head.zarr")
    existing = _finished(url, config)
    t0 = time.perf_counter()
    if existing is None:
        def stages(name):
            return progress(f"head: {name}")

        rep = build_head(sample.gguf, url, overwrite=True, stages=stages,
                         config=HeadConfig(hidden=sample.train, int8=True,
                                           order=OrderConfig(iterations=config.iterations)))
        build = {**rep.to_dict(), "status": "ran"}
        adapter = AdapterStore.open(url, "r+")
        t1 = time.perf_counter()
        g = fit_band_gate(adapter, sample.train, stages=stages,
                          config=BandGateConfig(epochs=config.epochs, sparsity=config.sparsity))
        gate = {"status": "ran", "epochs": g.epochs, "best_epoch": g.best_epoch, "before": g.before,
                "after": g.after, "seconds": time.perf_counter() - t1}
    else:
        adapter = existing
        build = {"status": "skipped", "seconds": 0.0, "source": adapter.attrs().get("head", {}).get("source"),
                 "d_in": adapter.d_in, "d_out": adapter.d_out, "bands": adapter.n_bands,
                 "band_rows": adapter.band_rows}
        gate = {"status": "skipped", "after": (adapter.gates_record() or GatesRecord()).held_out}
    sparsities = tuple(sorted({0.05, 0.1, config.sparsity, 0.2}))
    with progress("head: quality") as prog:
        quality = benchmark_head(adapter, sample.held, sparsities=sparsities, masses=(0.99,), baselines=True,
                                 progress=prog)
    with progress("head: speed") as prog:
        dense = torch.from_numpy(np.asarray(open_matrix(sample.gguf, tensor="lm_head").array[:], np.float32))
        runtime = _run_against_dense(adapter, dense, sample.held, config, prog)
    V, d, n = adapter.d_out, adapter.d_in, adapter.n_bands
    dense_bytes = 4 * V * d
    gate_bytes = 4 * n * (d + 1)
    chosen = next(s for s in quality["settings"] if s["setting"] == f"rho={config.sparsity:g}")
    sizes = {"dense_fp32": dense_bytes, "tiles_fp32": dense_bytes, "tiles_int8": V * d + 4 * V,
             "gate": gate_bytes, "order": 8 * V, "per_token_fp32": chosen["bytes_per_token"],
             "per_token_vs_dense": chosen["bytes_ratio"], "cache_budget": runtime["cache_bytes"]}
    plot = plot_head(quality, out / "plots" / "head_top1.png")
    return {"adapter": url, "sample": asdict(sample), "config": asdict(config), "build": build, "gate": gate,
            "quality": quality, "runtime": runtime, "bytes": sizes, "plot": plot,
            "seconds": time.perf_counter() - t0}


def _finished(url: str, config: HeadDemoConfig) -> AdapterStore | None:
    """The adapter of an earlier demo run with the same gate settings, or ``None``."""
    try:
        a = AdapterStore.open(url, "r+")
    except StoreError:
        return None
    settings = a.gate_settings()
    same = settings.get("epochs") == config.epochs and settings.get("sparsity") == config.sparsity
    return a if a.complete and same else None


def _median_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run_against_dense(adapter: AdapterStore, dense: torch.Tensor, held, config: HeadDemoConfig,
                       progress: ProgressFn | None) -> dict:
    """Top-1 of the sparse runtime against ``F.linear(x, dense)`` on every held-out row; speed ratios
    (batch 1 and ``config.batch``) timed interleaved in this run; then ``config.cache_tokens`` rows
    one at a time through a runtime whose tile cache holds ``config.cache_share`` of the bands."""
    from prismoe_store.runtime.bands import SelectRuntime
    from prismoe_store.runtime.grouped import RuntimeConfig
    from prismoe_store.stores.pairs import open_rows

    read, S = open_rows(held, adapter.d_in)
    x_all = torch.from_numpy(read(0, S))  # [S, d]
    steps = S + 2 * config.repeats + config.cache_tokens
    rt = SelectRuntime(adapter, RuntimeConfig(sparsity=config.sparsity))  # every band resident: compute only
    def linear(x):
        return torch.nn.functional.linear(x, dense)

    same = 0
    with torch.no_grad():
        for start in range(0, S, config.batch):
            x = x_all[start:start + config.batch]
            same += int((rt(x).argmax(1) == linear(x).argmax(1)).sum())
            if progress:
                progress(min(S, start + config.batch), steps)
        row_share = rt.stats()["row_share"]
        one, batch = x_all[:1], x_all[:config.batch]
        t: dict[str, list[float]] = {"dense_1": [], "sparse_1": [], "dense_b": [], "sparse_b": []}
        for r in range(config.repeats):  # interleaved: both sides see the same machine load
            for key, fn, x in (("dense_1", linear, one), ("sparse_1", rt, one), ("dense_b", linear, batch),
                               ("sparse_b", rt, batch)):
                t[key].append(_median_seconds(fn, x, 5))
            if progress:
                progress(S + 2 * (r + 1), steps)
        rt.close()
        band_bytes = adapter.band_rows * adapter.d_in * 4
        budget = max(band_bytes, int(config.cache_share * adapter.n_bands) * band_bytes)
        small = SelectRuntime(adapter, RuntimeConfig(sparsity=config.sparsity, cache_bytes=budget))
        for i in range(min(S, config.cache_tokens)):
            small(x_all[i:i + 1])
            if progress:
                progress(S + 2 * config.repeats + i + 1, steps)
        cache = small.stats()["cache"]
        small.close()
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"rows": S, "sparsity": config.sparsity, "top1_agreement": same / S, "top1_same": same,
            "row_share": row_share, "threads": torch.get_num_threads(), "batch": config.batch,
            "latency_vs_dense": med["sparse_1"] / med["dense_1"],
            "throughput_vs_dense": med["dense_b"] / med["sparse_b"], "seconds": med,
            "cache_bytes": budget, "cache_tokens": min(S, config.cache_tokens), "cache": cache}


def format_head_demo(r: dict) -> list[str]:
    """The head part of the demo's report, as lines."""
    q, rt, b = r["quality"], r["runtime"], r["bytes"]
    V, d = q["V"], q["d"]
    mib = 2 ** 20
    rho = rt["sparsity"]
    ran = r["build"]["status"] == "ran"
    lines = [f"1. A real head as a sparse adapter: {r['sample']['label']}, {V} x {d} -> {r['adapter']}",
             f"   {q['bands']} bands of {q['band_rows']} rows, vocabulary clustered in the hidden states' metric"
             + (f", built in {r['build']['seconds']:.1f} s; gate trained {r['gate']['epochs']} epochs in "
                f"{r['gate']['seconds']:.1f} s" if ran else " (reused from an earlier run)"),
             (f"   routing on {q['rows']} held-out hidden states (docstrings of modules the gate never saw), "
             "against the dense head:"),
             (f"   {'routing':12s}{'top-1 agreement':>17s}{'mass kept':>11s}{'rows computed':>15s}"
             f"{'bytes/token':>13s}")]
    for s in q["settings"]:
        lines.append(f"   {s['setting']:12s}{s['top1']:>17.4f}{s['mass']:>11.4f}{s['row_share']:>15.3f}"
                     f"{s['bytes_ratio']:>12.3f}x")
    key = f"rho={rho:g}"
    cont = {s["setting"]: s for s in q.get("contiguous", [])}
    svd = {s["setting"]: s for s in q.get("svd", [])}
    if key in cont and key in svd:
        lines.append(f"   the same bytes at rho = {rho:g} otherwise: bands of contiguous token ids top-1 "
                     f"{cont[key]['top1']:.4f}, a truncated SVD (rank {svd[key]['rank']}) {svd[key]['top1']:.4f}")
    lines += [(f"   bytes: the dense head is {b['dense_fp32'] / mib:.1f} MiB fp32; at rho = {rho:g} a token reads "
              f"{b['per_token_fp32'] / mib:.2f} MiB of it ({b['per_token_vs_dense']:.3f}x, the gate's "
              f"{b['gate'] / mib:.2f} MiB included); INT8 tiles {b['tiles_int8'] / mib:.1f} MiB"),
              (f"   the runtime itself on the {rt['rows']} rows: the same top-1 token as the dense head for "
              f"{rt['top1_same']} ({rt['top1_agreement']:.4f}), computing {rt['row_share']:.3f} of the rows"),
              (f"   speed ({rt['threads']} thread(s), ratios timed in one run): latency at batch 1 "
              f"{rt['latency_vs_dense']:.2f}x the dense head's, throughput at batch {rt['batch']} "
              f"{rt['throughput_vs_dense']:.2f}x the dense head's"),
              (f"   a tile cache of {b['cache_budget'] / mib:.1f} MiB ({r['config']['cache_share']:.0%} of the bands), "
              f"{rt['cache_tokens']} tokens one at a time: hit rate {rt['cache']['hit_rate']:.2f}, "
              f"{rt['cache']['bytes_loaded'] / rt['cache_tokens'] / mib:.2f} MiB loaded per token")]
    return lines


def takeaway(head: dict | None, synthetic: dict | None) -> str:
    """The report's closing paragraph, from the measured numbers."""
    parts = []
    if head is not None:
        q, rt, b = head["quality"], head["runtime"], head["bytes"]
        rho = rt["sparsity"]
        cont = {s["setting"]: s["top1"] for s in q.get("contiguous", [])}.get(f"rho={rho:g}")
        parts.append(
            f"On a real model's head the sparse adapter keeps the dense head's top token for "
            f"{rt['top1_agreement']:.1%} of held-out tokens while computing {rt['row_share']:.0%} of the rows and "
            f"reading {b['per_token_vs_dense']:.2f}x the dense head's bytes per token (gate included); only the "
            f"bands a token needs have to be in device memory, so a head too big for it can be served from a "
            f"small tile cache, and INT8 tiles quarter the bytes again."
            + (f" The clustered vocabulary is what makes this work: bands of consecutive token ids keep only "
               f"{cont:.1%} at the same bytes." if cont is not None else "")
            + f" On CPU with every band resident it computed one token in {rt['latency_vs_dense']:.2f}x the "
              f"dense head's time and a batch of {rt['batch']} at {rt['throughput_vs_dense']:.2f}x its throughput: "
              "the saving is memory first, speed only where few rows are read per call.")
    if synthetic is not None:
        parts.append("The synthetic part shows the fitted adapter, the other layout: three pipes of partial "
                     "tiles that learn a gated map from pairs, with more bytes than the dense matrix (the gates "
                     "included) and slower on CPU; it pays off only where its gates pick few tiles of a "
                     "matrix too large for device memory.")
    return " ".join(parts)
