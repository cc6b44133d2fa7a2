"""`prismoe infer`, `prismoe quantize`, `prismoe generate` and `prismoe benchmark runtime`."""

from __future__ import annotations

import click

from cli.options import gather_prompts, model_option, prompt_options
from cli.output import echo_json, note_input_layer
from cli.progress import bar, quiet_option
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import open_rows


def _runtime_options(f):
    """The options every runtime command shares."""
    for opt in reversed([
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--cache-mb", type=float, default=None, help="Tile cache budget in MiB [default: every tile]."),
        click.option("--int8", is_flag=True, help="Use the INT8 tiles (run `prismoe quantize` first)."),
        click.option("--schedule", "--mode", "schedule", type=click.Choice(["parallel", "serial"]), default="parallel",
                     show_default=True, help="How the pipes share the tile cache; serial: one pipe's tiles in it at "
                                             "a time (--mode is the old spelling)."),
        click.option("--sparsity", type=float, default=None,
                     help="ρ, share of tiles (bands of a head adapter) per token [default: the gates' ρ; "
                          "1.0 without gates; 0.1 for a head adapter]."),
        click.option("--mass", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Head adapters: per token, the fewest bands whose predicted probability mass reaches "
                          "this (at most ρ of them, ρ defaulting to 0.25 then)."),
    ]):
        f = opt(f)
    return f


def _runtime_kwargs(device, cache_mb, int8, schedule, sparsity, mass=None) -> dict:
    return {"device": device, "cache_bytes": None if cache_mb is None else max(1, int(cache_mb * 2**20)),
            "quant": "int8" if int8 else None, "schedule": schedule, "sparsity": sparsity, "mass": mass}


@click.command("infer")
@click.argument("adapter")
@click.option("--input", "input_path", required=True, help="x as a .npy file [rows, d_in], or a pairs store.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Where to write y (.npy).")
@_runtime_options
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Rows per call.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object of statistics.")
@quiet_option
def infer_cmd(adapter, input_path, output, device, cache_mb, int8, schedule, sparsity, mass, batch_size, as_json,
              quiet):
    """Run ADAPTER on input rows and write y [rows, d_out] (float32) to OUTPUT."""
    from prismoe_store.fit import keep_freed_memory
    from prismoe_store.runtime.infer import cache_line, check_output_folder, infer_line, infer_rows
    from prismoe_store.runtime.open import open_runtime

    keep_freed_memory()  # this process runs one job: each batch's logits reuse freed memory, not fresh pages
    check_output_folder(output)
    store = AdapterStore.open(adapter, require_complete=True)
    read, rows = open_rows(input_path, store.d_in)
    note_input_layer(input_path, store)
    rt = open_runtime(store, **_runtime_kwargs(device, cache_mb, int8, schedule, sparsity, mass))
    with bar("infer", quiet=quiet or as_json, unit="row") as progress:
        stats = infer_rows(rt, read, rows, output, batch_size=batch_size, progress=progress)
    if as_json:
        echo_json(stats)
        return
    click.echo(infer_line(stats))
    click.echo(cache_line(stats))


@click.command("quantize")
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def quantize_cmd(adapter, as_json, quiet):
    """Write INT8 tiles (symmetric per-row absmax) into ADAPTER; resumable."""
    from dataclasses import asdict

    from prismoe_store.runtime.quant import quantize_adapter

    store = AdapterStore.open(adapter, "r+", require_complete=True)
    with bar("quantize", quiet=quiet or as_json, unit="tile") as progress:
        report = quantize_adapter(store, progress=progress)
    if as_json:
        echo_json(asdict(report))
        return
    if report.tiles == 0:
        click.echo(f"INT8 tiles were already complete ({report.skipped} tiles)")
        return
    ratio = report.bytes_int8 / report.bytes_fp32
    click.echo(f"quantized {report.tiles} tiles ({report.skipped} already done): {report.bytes_int8 / 2**20:.2f} MiB "
               f"INT8 for {report.bytes_fp32 / 2**20:.2f} MiB fp32 ({ratio:.2f}×); "
               f"largest tile relative error {report.max_rel_error:.2e}")


@click.command("generate")
@click.argument("adapter")
@model_option()
@prompt_options
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True,
              help="Tokens to generate (greedy).")
@click.option("--compare", is_flag=True, help="Also generate with the model's own head and report agreement.")
@click.option("--embedding", is_flag=True,
              help="Also replace the input embedding by the adapter's rows (a head adapter of a tied matrix).")
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def generate_cmd(adapter, model, prompts, prompts_file, max_new_tokens, compare, embedding, device, cache_mb, int8,
                 schedule, sparsity, mass, as_json, quiet):
    """Generate greedily from MODEL with its lm_head replaced by ADAPTER (hidden → vocab)."""
    from prismoe_store.fit import keep_freed_memory
    from prismoe_store.head.generate import compare_summary, generate_all
    from prismoe_store.runtime.infer import cache_line

    keep_freed_memory()  # one job a process: each token's logits reuse freed memory, not fresh pages
    prompts = gather_prompts(prompts, prompts_file)
    if not (quiet or as_json):
        click.echo(f"note: loading the model {model} (a GGUF is dequantized into float tensors first), then "
                   f"{len(prompts)} prompt(s) of {max_new_tokens} new tokens"
                   + (", twice to compare" if compare else ""),
                   err=True)
    with bar("generate", quiet=quiet or as_json, unit="prompt") as progress:
        if progress:
            progress(0, len(prompts))
        results = generate_all(adapter, model, prompts, max_new_tokens=max_new_tokens, compare=compare,
                               embedding=embedding, **_runtime_kwargs(device, cache_mb, int8, schedule, sparsity, mass))
        if progress:
            progress(len(prompts), len(prompts))
    rows = [{"prompt": p, "text": g.text, "original": g.original, "same": g.same, "new_tokens": g.new_tokens,
             "agreement": g.agreement, "identical_prefix": g.identical_prefix, **g.stats}
            for p, g in zip(prompts, results, strict=True)]
    summary = compare_summary(results) if compare else None
    if as_json:
        echo_json(rows[0] if len(rows) == 1 else {"generations": rows, "summary": summary})
        return
    for r in rows:
        click.echo(f"prismoe: {r['text']}")
        if compare:
            click.echo(f"original: {r['original']}")
            click.echo(f"same text: {r['same']}; the first {r['identical_prefix']} of {r['new_tokens']} new tokens "
                       f"identical; token agreement by position {r['agreement']:.3f}")
        if "row_share" in r:
            click.echo(f"rows computed per token: {r['row_share']:.3f} of the head")
        click.echo(cache_line(r))
    if summary:
        click.echo(f"{summary['same_text']} of {summary['prompts']} prompts gave the same text; "
                   f"on average the first {summary['mean_identical_prefix']:.1f} new tokens identical; "
                   f"mean token agreement by position {summary['mean_agreement']:.3f}")


@click.command("runtime")
@click.argument("adapter", required=False)
@click.argument("hidden", required=False)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ... (baselines too).")
@click.option("--sparsity", type=float, default=None,
              help="ρ, share of tiles (bands) per token [default: the adapter's; 0.3 for the synthetic one].")
@click.option("--mass", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Head adapters: a predicted-mass threshold (see `prismoe infer --mass`).")
@click.option("--input", "input_path", default=None,
              help="Token rows in trace order (.npy or pairs store), same as HIDDEN [default: Gaussian].")
@click.option("--d-in", type=int, default=512, show_default=True, help="Synthetic adapter input width.")
@click.option("--d-out", type=int, default=8192, show_default=True, help="Synthetic adapter output width.")
@click.option("--workers", type=int, default=512, show_default=True, help="Synthetic adapter workers per pipe.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Throughput batch.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repeats per measurement (medians are reported).")
@click.option("--hit-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens measured per budget of the sweep (after as many warm-up tokens).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads for runtime and baselines alike [default: torch's choice].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the tables here (.md).")
@click.option("--plots", type=click.Path(file_okay=False), default=None, help="Write hit_rate.png here.")
@quiet_option
def bench_runtime_cmd(adapter, hidden, device, sparsity, mass, input_path, d_in, d_out, workers, batch, repeats,
                      hit_tokens, threads, as_json, markdown, plots, quiet):
    """Runtime speed against dense F.linear, naive offload and a host-side matrix; INT8 vs fp32;
    hit rate and latency against the device budget over a decoding trace; serial vs parallel pipes
    (fitted adapters: a head has no pipe schedule).

    ADAPTER is a fitted or a head adapter; HIDDEN the input rows in trace order (e.g. a hidden-state
    store from `prismoe collect --target none`). Without ADAPTER a synthetic three-pipe adapter of
    --d-in → --d-out is built in a temporary folder.
    """
    from prismoe_store.bench.runtime import benchmark_runtime_store, format_report, write_outputs

    if hidden and input_path:
        raise click.UsageError("give the input rows once: HIDDEN or --input")
    store = AdapterStore.open(adapter, require_complete=True) if adapter else None
    if store is not None:
        note_input_layer(hidden or input_path, store)
    report = benchmark_runtime_store(store, rows=hidden or input_path, d_in=d_in, d_out=d_out, workers=workers,
                                     device=device, sparsity=sparsity, mass=mass, batch=batch, repeats=repeats,
                                     hit_tokens=hit_tokens, threads=threads,
                                     stage=lambda name, unit: bar(name, quiet=quiet or as_json, unit=unit))
    written = write_outputs(report, markdown=markdown, plots=plots)
    if as_json:
        echo_json(report)
        return
    click.echo(format_report(report))
    for p in written:
        click.echo(f"wrote {p}")


commands = [infer_cmd, quantize_cmd, generate_cmd]
bench_commands = [bench_runtime_cmd]
