"""``prismoe train`` (collect → fit → fit-gates → quantize), ``prismoe demo`` and ``prismoe benchmark adapter``."""

from __future__ import annotations

import os

import click

from cli.messages import warn_padding
from cli.options import device_option, json_option, overwrite_option, plot_dir_option
from cli.output import echo_json, output_store
from cli.progress import bar, quiet_option, stage_bars

_TARGETS = ("logits", "embeddings", "hidden")  # prismoe_store.data.collect.TARGETS (not imported: it loads numpy)
_POOLS = ("none", "last", "mean")




def _stage_bars(quiet: bool):
    """A ``progress(stage)`` factory for the pipeline: one bar per stage (none when quiet)."""
    return stage_bars(quiet, {"collect": "tok"}, growing=("collect",))


def _floats(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not out:
        raise click.BadParameter("expected at least one number")
    return out


@click.command("train")
@click.option("--upper", default=None, metavar="MODEL", help="Model giving x (HF folder or .gguf).")
@click.option("--lower", default=None, metavar="MODEL", help="Model giving z (default: the upper model).")
@click.option("--text", "texts", multiple=True, metavar="PATH", help="Text file to collect on (repeatable).")
@click.option("-o", "--output", "adapter", required=True, callback=output_store,
              help="Adapter store to write (path or URL).")
@click.option("--pairs", default=None,
              help="Pairs store [default: beside the adapter, ADAPTER.pairs.zarr]. An existing store is used "
                   "as it is when --upper/--text are not given.")
@click.option("--target", type=click.Choice(_TARGETS), default="logits", show_default=True,
              help="z: lower logits, the next token's input embedding, or a lower hidden state.")
@click.option("--layer", type=int, default=-1, show_default=True, help="Upper hidden_states index (-1: last).")
@click.option("--pool", type=click.Choice(_POOLS), default="none", show_default=True,
              help="none: a pair per token; last / mean: a pair per document.")
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per sequence.")
@click.option("--max-tokens", type=int, default=None, help="Stop collecting at this many tokens.")
@click.option("--workers", type=int, default=512, show_default=True, help="Tiles per pipe (a power of 2).")
@click.option("--mode", type=click.Choice(["joint", "independent"]), default="joint", show_default=True,
              help="Fit mode of the tiles.")
@click.option("--sparsity", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True,
              help="ρ the gates are trained at.")
@click.option("--epochs", type=click.IntRange(min=0), default=30, show_default=True,
              help="Most gate-training epochs (early stopping on held-out rows).")
@click.option("--int8", is_flag=True, help="Also write INT8 tiles (the quantize stage).")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of rows held out.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the split.")
@click.option("--scheduler", default=None, help="Fit scheduler: threads, processes, synchronous or tcp://HOST:PORT.")
@device_option("Device of collection and gate training.")
@overwrite_option("Redo every stage from scratch.")
@json_option("Print the summary as one JSON object.")
@quiet_option
def train_cmd(upper, lower, texts, adapter, pairs, target, layer, pool, max_length, max_tokens, workers, mode,
              sparsity, epochs, int8, holdout, seed, scheduler, device, overwrite, as_json, quiet):
    """Collect pairs, fit the tiles, train the gates (and quantize): MODEL + text → ADAPTER.

    Each stage is resumable and finished stages are skipped, so re-running the same command after
    an interruption finishes the rest.
    """
    from prismoe_store.data.collect import CollectSpec
    from prismoe_store.pipeline import (
        TrainConfig,
        default_pairs_path,
        format_train,
        train,
    )

    if (upper is None) != (not texts):
        raise click.UsageError("give both --upper MODEL and --text PATH to collect pairs, or neither "
                               "(then --pairs must name an existing pairs store)")
    spec = CollectSpec(layer=layer, target=target, pool=pool, max_length=max_length, max_tokens=max_tokens,
                       device=device)
    cfg = TrainConfig(collect=spec, mode=mode, workers=workers, holdout=holdout, seed=seed, scheduler=scheduler,
                      sparsity=sparsity, epochs=epochs, device=device, int8=int8)
    warn_padding(pairs or default_pairs_path(adapter), workers)
    log = None if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    report = train(upper, lower, list(texts) or None, adapter, pairs=pairs, config=cfg, overwrite=overwrite,
                   progress=_stage_bars(quiet or as_json), log=log)
    if as_json:
        echo_json(report.as_dict())
    else:
        click.echo(format_train(report))


@click.command("demo")
@click.option("-o", "--output", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the adapters, report and plots [default: a new temporary folder, kept].")
@click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Gate-training epochs of the synthetic part.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads (the sample's matrices are too small for more to help).")
@json_option("Print one JSON object.")
@quiet_option
def demo_cmd(out_dir, epochs, threads, as_json, quiet):
    """Show what prismoe buys on the data in sample_data/, in about a minute.

    1. A real head: SmolLM2-135M's output head (token ids 0-8191, Q8_0 from its GGUF) becomes a
    sparse head adapter (clustered bands, a gate trained briefly on the model's hidden states), and
    is measured against the dense head on held-out hidden states: top-1 agreement, bytes, speed.
    2. The fitted-adapter pipeline (fit → fit-gates → quantize → benchmark) on the synthetic sample
    pairs (3072 pairs 64 → 256, gated target). Writes results.md, benchmark.json and plots/*.png.
    """
    from prismoe_store.demo import demo, format_demo

    log = None if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    result = demo(out_dir, epochs=epochs, threads=threads, progress=_stage_bars(quiet or as_json), log=log)
    if as_json:
        echo_json(result)
    else:
        click.echo(format_demo(result))


@click.command("adapter")
@click.argument("adapter")
@click.argument("pairs")
@click.option("--sparsities", default="0.1,0.3,0.5,1", show_default=True, callback=_floats,
              help="Comma-separated ρ values the adapter runs at.")
@device_option("cpu, cuda, cuda:1, ...")
@click.option("--logits/--no-logits", default=None,
              help="Z are logits: add top-1 agreement and KL [default: from the pairs' provenance].")
@click.option("--max-rows", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Held-out rows evaluated.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Throughput batch.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved timing repeats (medians).")
@click.option("--hit-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Hit-rate sweep: warm-up tokens, then as many measured, per budget.")
@click.option("--hit-sparsities", default=None, callback=_floats,
              help="ρ values of the hit-rate sweep [default: the sparsities below 1].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads for every method alike [default: torch's choice].")
@click.option("--from-store", is_flag=True, help="Read tiles from the store on every miss (default: host RAM).")
@json_option("Print the report as one JSON object.")
@plot_dir_option("--plots", help="Write quality_vs_bytes.png, hit_rate.png and latency.png here.")
@click.option("--markdown", "markdown", type=click.Path(dir_okay=False), default=None,
              help="Write the Markdown table to this file.")
@quiet_option
def bench_adapter_cmd(adapter, pairs, sparsities, device, logits, max_rows, batch, repeats, hit_tokens,
                      hit_sparsities, threads, from_store, as_json, plot_dir, markdown, quiet):
    """Dense ridge vs truncated SVD (same bytes) vs the adapter at several ρ, fp32/INT8, parallel/serial.

    On the same held-out rows and device: relative error, R² (top-1, KL for logits), latency and
    throughput as ratios to dense F.linear, active bytes, peak cache bytes, hit rate.
    """
    from prismoe_store.bench.adapter import (
        benchmark_adapter,
    )
    from prismoe_store.bench.adapter_report import format_markdown, write_plots

    with bar("benchmark", quiet=quiet or as_json, unit="step") as progress:
        report = benchmark_adapter(adapter, pairs, sparsities=sparsities, device=device, logits=logits,
                                   max_rows=max_rows, batch=batch, repeats=repeats, hit_tokens=hit_tokens,
                                   hit_sparsities=hit_sparsities, threads=threads,
                                   tiles_in_ram=False if from_store else None, progress=progress)
    text = format_markdown(report)
    if plot_dir:
        report["plots"] = write_plots(report, plot_dir)
    if markdown:
        os.makedirs(os.path.dirname(os.path.abspath(markdown)), exist_ok=True)
        with open(markdown, "w") as fh:
            fh.write(text)
        report["markdown"] = markdown
    if as_json:
        echo_json(report)
        return
    click.echo(text)
    for path in report.get("plots", []) + ([markdown] if markdown else []):
        click.echo(f"wrote {path}")


commands = [train_cmd, demo_cmd]
bench_commands = [bench_adapter_cmd]
