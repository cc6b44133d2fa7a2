"""``prismoe fit`` (phase 1: the one-shot streaming fit) and ``prismoe benchmark fit``."""

from __future__ import annotations

import click

from cli.messages import warn_padding
from cli.output import echo_json, open_pairs, output_store
from cli.progress import bar, quiet_option


def _complete_adapter(url) -> bool:
    """Whether ``url`` holds a finished adapter (``fit`` then only checks it)."""
    from prismoe_store.errors import PrismoeError
    from prismoe_store.stores.adapter import AdapterStore

    try:
        return AdapterStore.open(url).complete
    except PrismoeError:
        return False


def _alphas(value: str | None):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}") from None


@click.command("fit")
@click.argument("pairs")
@click.option("-o", "--output", "adapter", required=True, callback=output_store,
              help="Adapter store to write (path or URL).")
@click.option("--mode", type=click.Choice(["joint", "independent"]), default="joint", show_default=True,
              help="joint: band-wise ridge over the whole input (pipes reproduce the dense solution); "
                   "independent: each tile fits its own input slice.")
@click.option("--workers", type=int, default=512, show_default=True, help="Tiles per pipe (a power of 2).")
@click.option("--ridge", type=float, default=None, help="Ridge λ (default: 1e-6·trace(XᵀX)/d_in).")
@click.option("--holdout", type=float, default=0.1, show_default=True, help="Share of rows held out for metrics.")
@click.option("--subsample", type=float, default=0.6, show_default=True,
              help="Share of the training rows pipe 2 fits on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split and subsample.")
@click.option("--alphas", default=None, help="Pipe weights α1,α2,α3 summing to 1 (default: equal).")
@click.option("--solver", type=click.Choice(["cholesky", "qr"]), default="cholesky", show_default=True,
              help="cholesky: normal equations; qr: streaming TSQR for ill-conditioned inputs.")
@click.option("--precision", type=click.Choice(["mixed", "float64", "float32"]), default="mixed", show_default=True,
              help="Products of each row block (always summed in float64): mixed: XᵀX in float64, XᵀZ in "
                   "float32 (float32 speed; rounding dropped where X lacks variance); float64: float64-accurate "
                   "whatever the BLAS kernel, half the speed; float32: for well-conditioned inputs only.")
@click.option("--scheduler", default="threads", show_default=True,
              help="threads, processes, synchronous, or a dask.distributed address (tcp://HOST:PORT).")
@click.option("--tasks", type=int, default=None, help="Row stripes accumulated in parallel (default: threads).")
@click.option("--memory-mb", type=int, default=None,
              help="RAM budget for statistics and row blocks in MiB (default: 1/4 of physical memory).")
@click.option("--block-rows", type=int, default=None, help="Rows per product block (default: 4096).")
@click.option("--keep-statistics", is_flag=True, help="Keep the G/B scratch in the adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--overwrite", is_flag=True, help="Replace an existing adapter.")
@quiet_option
def fit_cmd(pairs, adapter, mode, workers, ridge, holdout, subsample, seed, alphas, solver, precision, scheduler,
            tasks, memory_mb, block_rows, keep_statistics, as_json, overwrite, quiet):
    """Fit the three pipes' tiles on PAIRS by streamed least squares and write the adapter.

    One pass over the pairs (Dask, out of core), then ridge solves; held-out relative error and
    R² per pipe are stored in the adapter and printed. Re-running an interrupted fit resumes it; a
    finished one is checked and left as it is.
    """
    from prismoe_store.fit import FitConfig, describe_ridge, fit, keep_freed_memory

    keep_freed_memory()  # this process runs one fit: reuse freed memory rather than fresh zeroed pages
    finished = not overwrite and _complete_adapter(adapter)  # then fit checks it and does nothing
    with bar("fit", quiet=quiet or as_json, unit="unit") as shown:
        warned = [False]  # the padding warning: once, when a fit starts (a resumed one said it the first time)

        def progress(done: int, total: int) -> None:  # fit's first tick comes once its checks have passed
            if not warned[0]:
                warned[0] = True
                warn_padding(pairs, workers)  # so a refused fit prints its error alone
            if shown:
                shown(done, total)

        def log(line: str) -> None:  # the resume line (before the first tick): not progress, so -q keeps it
            warned[0] = True
            click.echo(line, err=True)

        config = FitConfig(mode=mode, workers=workers, ridge=ridge, holdout=holdout, subsample=subsample, seed=seed,
                           alphas=_alphas(alphas), solver=solver, precision=precision, tasks=tasks,
                           memory_budget=memory_mb << 20 if memory_mb else None, block_rows=block_rows,
                           keep_statistics=keep_statistics)
        store = fit(open_pairs(pairs, adapter), adapter, config, scheduler=scheduler, progress=progress,
                    overwrite=overwrite, log=log)
    info, metrics = store.fit_record().to_dict(), (store.metrics_record().to_dict() if store.metrics_record() else None)
    if as_json:
        echo_json({"adapter": str(adapter), "mode": store.mode, "alphas": store.alphas,
                               "grids": [g.to_dict() for g in store.grids], "rows": info["counts"],
                               "ridge": info["ridge"], "plan": info["plan"], "timings": info.get("timings", {}),
                               "warnings": info.get("warnings", []), "metrics": metrics,
                               "already_finished": finished})
        return
    if finished:
        click.echo(f"adapter {adapter}: already finished, nothing to do (--overwrite refits)")
    c = info["counts"]
    click.echo(f"adapter {adapter}: {store.mode} fit of {store.d_in}→{store.d_out}, "
               f"{c['train']} training rows ({c['sub']} for pipe 2), {c['holdout']} held out")
    for p, g in enumerate(store.grids):
        click.echo(f"  pipe {p + 1}: {g}")
    click.echo("  ridge λ: " + describe_ridge(info["ridge"], (info.get("settings") or {}).get("ridge")))
    for w in info.get("warnings", []):
        click.echo(f"  warning: {w}")
    if metrics is None:
        click.echo("  no held-out rows: no metrics")
        return
    click.echo(f"  held-out metrics over {metrics['holdout_rows']} rows (relative error ‖y − z‖/‖z‖; "
               "R² against predicting each output's mean: 1 is exact, 0 no better):")
    click.echo(f"    {'':10s} {'rel. error':>11s} {'R²':>9s}")
    names = [f"pipe {p + 1}" for p in range(len(metrics["pipes"]))] + ["combined"]
    for name, m in zip(names, metrics["pipes"] + [metrics["combined"]]):
        click.echo(f"    {name:10s} {m['rel_err']:11.5f} {m['r2']:9.5f}")
    if store.mode == "joint" and len(metrics["pipes"]) == 3:
        click.echo("    (joint: pipe 3 holds pipe 1's solution cut into its own grid, so their figures match)")


@click.command("fit")
@click.option("--rows", default="32768,65536", show_default=True,
              help="Comma-separated row counts; peak RSS and the rates are measured at each.")
@click.option("--d-in", type=int, default=1024, show_default=True, help="Input width of the synthetic pairs.")
@click.option("--d-out", type=int, default=8192, show_default=True, help="Output width of the synthetic pairs.")
@click.option("--workers", type=int, default=64, show_default=True,
              help="Tiles per pipe (64 keeps 1 MiB tiles at the default size, like the 4096→128256 preset's 4 MiB).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Runs per row count, interleaved across row counts (the best is reported too).")
@click.option("--precision", type=click.Choice(["mixed", "float64", "float32"]), default="mixed", show_default=True,
              help="The fit's --precision.")
@click.option("--memory-mb", type=int, default=None, help="The fit's memory budget in MiB (default: the fit's).")
@click.option("--compressor", type=click.Choice(["zstd", "blosc", "none"]), default=None,
              help="Codec of the synthetic pairs store (default: the pairs store default, none).")
@click.option("--lstsq", is_flag=True, help="Also time dask.array.linalg.lstsq on the largest pairs.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to write the synthetic pairs (default: a temporary folder, removed after).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def bench_fit_cmd(rows, d_in, d_out, workers, repeats, precision, memory_mb, compressor, lstsq, workdir, as_json,
                  quiet):
    """The whole `prismoe fit` command's FLOP rate as a ratio to this machine's float32 matmul rate,
    and its peak RSS, at several row counts (all measured in this run)."""
    from prismoe_store.bench.fit import benchmark_fit, format_report

    try:
        counts = tuple(int(r) for r in rows.split(","))
    except ValueError:
        raise click.BadParameter(f"--rows: expected comma-separated integers, got {rows!r}") from None
    report = benchmark_fit(rows=counts, d_in=d_in, d_out=d_out, workers=workers, repeats=repeats,
                           precision=precision, memory_budget=memory_mb << 20 if memory_mb else None,
                           compressor=compressor, lstsq=lstsq, workdir=workdir,
                           log=None if (quiet or as_json) else lambda s: click.echo(s, err=True))
    if as_json:
        echo_json(report)
    else:
        click.echo(format_report(report))


commands = [fit_cmd]
bench_commands = [bench_fit_cmd]
