"""The adapter benchmark's report: its Markdown text (:func:`format_markdown`) and its plots
(:func:`write_plots`), both from the JSON-ready dict :func:`~prismoe_store.bench.adapter.benchmark_adapter`
returns.
"""

from __future__ import annotations

import math
from pathlib import Path

from prismoe_store.plots import figure


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def _ratio(v) -> str:
    """A speed ratio with three significant digits (``1234``, ``12.3``, ``0.00123``)."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.0f}" if v >= 1000 else f"{v:.3g}"


def format_markdown(report: dict) -> str:
    """The benchmark as Markdown: a header, the side-by-side table, the hit-rate sweep and the checks.

    >>> r = {"adapter": "a", "pairs": "p", "device": "cpu", "threads": 2, "heldout": {"rows": 3, "logits": False},
    ...      "shape": {"d_in": 2, "d_out": 2, "mode": "joint", "grids": ["g"]}, "gates": {"trained": False},
    ...      "tiles_from": "host RAM", "rows": [], "hit_rate": [], "checks": {}, "config": {"batch": 64}}
    >>> format_markdown(r).splitlines()[0]
    '## Benchmark: a on p'
    """
    s, h = report["shape"], report["heldout"]
    gates = report["gates"]
    gate = f"trained gates (ρ = {gates['sparsity']})" if gates.get("trained") else "uniform gate (no trained gates)"
    batch = report["config"]["batch"]
    lines = [f"## Benchmark: {report['adapter']} on {report['pairs']}", "",
             f"{s['d_in']} → {s['d_out']}, {s['mode']} tiles, {gate}; {h['rows']} held-out rows; "
             f"device {report['device']} ({report['threads']} CPU thread{'s' if report['threads'] != 1 else ''}); "
             f"tiles served from {report['tiles_from']}.",
             ""]
    lines += [f"- pipe {p + 1}: {g}" for p, g in enumerate(s["grids"])]
    lines.append("")
    logit_cols = h.get("logits")
    head = ["method", "rel. error", "R²"] + (["top-1", "KL"] if logit_cols else []) + ["‖Δy‖ INT8/fp32",
        "latency ×dense (b=1)", f"throughput ×dense (b={batch})", "active bytes/token", "×dense bytes",
        "×dense with gates", f"peak cache (b={batch}, cold)", "hit rate (timed)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in report["rows"]:
        cells = [r["label"] + (" ★" if r.get("pareto") else ""), _num(r["rel_err"], ".4f"), _num(r["r2"], ".4f")]
        if logit_cols:
            cells += [_num(r.get("top1"), ".3f"), _num(r.get("kl"), ".4f")]
        cells.append(_num(r.get("output_vs_fp32"), ".1e"))
        cells += [_ratio(r["latency_vs_dense"]), _ratio(r["throughput_vs_dense"]), _bytes(r["active_bytes"]),
                  _num(r["active_vs_dense"], ".3f"), _num(r.get("with_gates_vs_dense"), ".3f"),
                  _bytes(r.get("peak_cache_bytes")), _num(r.get("hit_rate"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    if report["rows"]:
        d = report["rows"][0]
        lines += ["", f"★: on the Pareto frontier of relative error against active bytes. Dense F.linear: "
                      f"{d['dense_latency_s'] * 1e6:.1f} µs at batch 1, {d['dense_throughput_tok_s']:.0f} tokens/s "
                      f"at batch {batch}. Peak cache: the most bytes the tile cache held during one call of {batch} "
                      "held-out tokens from a cold cache; hit rate: while timed (warm, steady state). "
                      "Serial rows share the parallel rows' quality (same sums, another order). "
                      "‖Δy‖ INT8/fp32: relative difference of the INT8 adapter's outputs from the fp32 "
                      "adapter's at the same ρ."]
        gate_bytes = (report.get("memory") or {}).get("gate_bytes")
        if gate_bytes:
            lines[-1] += (f" Active bytes count the selected tiles; every token also reads every pipe's gate "
                          f"({_bytes(gate_bytes)} fp32, {gate_bytes / d['active_bytes']:.3f}× the dense matrix): "
                          "“×dense with gates” adds them.")
    if report["hit_rate"]:
        rhos = sorted({c["sparsity"] for c in report["hit_rate"]})
        shares = sorted({c["share"] for c in report["hit_rate"]})
        cell = {(c["sparsity"], c["share"]): c for c in report["hit_rate"]}
        lines += ["", "Cache hit rate against the budget (one token a call, after as many warm-up tokens):", "",
                  "| budget (share of all tiles) | " + " | ".join(f"ρ = {r:g}" for r in rhos) + " |",
                  "|---" + "|---:" * len(rhos) + "|"]
        for sh in shares:
            lines.append(f"| {sh:.2%} ({_bytes(cell[(rhos[0], sh)]['budget_bytes'])}) | "
                         + " | ".join(_num(cell[(r, sh)]["hit_rate"], ".3f") if (r, sh) in cell else "—" for r in rhos)
                         + " |")
    c = report.get("checks") or {}
    if c:
        parts = []
        if "uniform_rho1_rel_err" in c:
            parts.append(f"runtime with a uniform gate at ρ = 1: relative error {c['uniform_rho1_rel_err']:.6f} "
                         f"(dense {report['rows'][0]['rel_err']:.6f})")
        if c.get("fit_combined_rel_err") is not None:
            parts.append(f"the fit's own held-out relative error {c['fit_combined_rel_err']:.6f} "
                         f"(on all its {c.get('fit_holdout_rows')} held-out rows)")
        if "serial_vs_parallel_max_rel_diff" in c:
            parts.append(f"serial vs parallel outputs differ by at most {c['serial_vs_parallel_max_rel_diff']:.1e} "
                         "(relative to max |y|)")
        lines += ["", "Checks: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def write_plots(report: dict, out_dir) -> list[str]:
    """Draw the report as PNGs in ``out_dir``: ``quality_vs_bytes.png`` (the Pareto frontier),
    ``hit_rate.png`` (hit rate against the cache budget) and ``latency.png`` (speed ratios against ρ).
    Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    dense = rows[0]
    paths = []

    # quality against active bytes
    fig = figure(7.0, 4.6, dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    curve = report["svd_curve"]
    ax.plot([c["active_bytes"] for c in curve], [c["rel_err"] for c in curve], "-", color="C0", lw=1.2, alpha=0.6,
            label="truncated SVD (rank 1 … full)")
    svd = [r for r in rows if r["method"] == "svd"]
    ax.plot([r["active_bytes"] for r in svd], [r["rel_err"] for r in svd], "s", color="C0", ms=6,
            label="SVD at the adapter's fp32 bytes")
    for i, quant in enumerate(report["quants"]):
        pts = sorted((r["active_bytes"], r["rel_err"], r["sparsity"]) for r in rows
                     if r["method"] == "adapter" and r["quant"] == quant and r["schedule"] == "parallel")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i + 1}", label=f"adapter {quant}")
        for b, e, rho in pts:
            ax.annotate(f"ρ={rho:g}", (b, e), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i + 1}")
        gate = (report.get("memory") or {}).get("gate_bytes")
        if gate:  # the gates are read for every token: the bytes a token really costs
            ax.plot([p[0] + gate for p in pts], [p[1] for p in pts], "o--", color=f"C{i + 1}", mfc="none", lw=0.8,
                    label=f"adapter {quant} + gates ({gate / 1024:.0f} KiB a token)")
    ax.plot([dense["active_bytes"]], [dense["rel_err"]], "*", color="k", ms=12, label="dense ridge (F.linear)")
    front = sorted((r["active_bytes"], r["rel_err"]) for r in rows if r.get("pareto"))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.3", ls="--", lw=1,
                label="Pareto frontier")
    ax.set_xscale("log")
    errs = [r["rel_err"] for r in rows if math.isfinite(r["rel_err"])] + [c["rel_err"] for c in curve]
    if errs and min(errs) > 0 and max(errs) > 20 * min(errs):
        ax.set_yscale("log")
    ax.set_xlabel("active weight bytes per token")
    ax.set_ylabel("held-out relative error ‖y − z‖/‖z‖")
    ax.set_title(f"quality against bytes: {report['shape']['d_in']}→{report['shape']['d_out']}, "
                 f"{report['heldout']['rows']} held-out rows", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    paths.append(out / "quality_vs_bytes.png")
    fig.savefig(paths[-1], format="png")

    # hit rate against the cache budget
    fig = figure(6.0, 4.0, dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for i, rho in enumerate(sorted({c["sparsity"] for c in report["hit_rate"]})):
        hits = sorted((c["share"], c["hit_rate"]) for c in report["hit_rate"] if c["sparsity"] == rho)
        ax.plot([100 * p[0] for p in hits], [p[1] for p in hits], "o-", color=f"C{i}", label=f"ρ = {rho:g}")
        ax.axvline(100 * rho, color=f"C{i}", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("cache budget (% of all tiles' bytes; dotted: ρ)")
    ax.set_ylabel("hit rate")
    ax.set_title("tile cache hit rate, one held-out token a call", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(out / "hit_rate.png")
    fig.savefig(paths[-1], format="png")

    # speed ratios against ρ
    fig = figure(9.0, 3.8, dpi=110)
    for k, (key, title) in enumerate((("latency_vs_dense", "latency, batch 1 (× dense; lower is better)"),
                                      ("throughput_vs_dense", f"throughput, batch {report['config']['batch']} "
                                                              "(× dense; higher is better)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        i = 0
        for quant in report["quants"]:
            for schedule in ("parallel", "serial"):
                curve = sorted((r["sparsity"], r[key]) for r in rows
                               if r["method"] == "adapter" and r["quant"] == quant and r["schedule"] == schedule)
                if curve:
                    ax.plot([p[0] for p in curve], [p[1] for p in curve], "o-" if schedule == "parallel" else "s--",
                            color=f"C{i + 1}", label=f"adapter {quant} {schedule}")
                    i += 1
        svd = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == "svd")
        ax.plot([p[0] for p in svd], [p[1] for p in svd], "^:", color="C0", label="SVD, same bytes")
        ax.axhline(1.0, color="k", lw=1, label="dense F.linear")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity ρ")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"speed as ratios to dense F.linear on {report['device']} (medians of "
                 f"{report['config']['repeats']} interleaved repeats)", fontsize=10)
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], format="png")
    return [str(p) for p in paths]
