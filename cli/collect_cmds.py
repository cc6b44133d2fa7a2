"""``prismoe collect`` (activation pairs from real models) and ``prismoe benchmark collect``."""

from __future__ import annotations

from dataclasses import replace

import click

from cli.options import (
    compressor_option,
    device_option,
    gather_prompts,
    json_option,
    model_option,
    overwrite_option,
    prompt_options,
)
from cli.output import echo_json, output_store
from cli.progress import bar, quiet_option
from prismoe_store.data.collect import (
    NONFINITE,
    POOLS,
    TARGETS,
    CollectSpec,
    collect,
    format_collect,
)
from prismoe_store.data.collect_bench import benchmark_collect, format_benchmark_collect
from prismoe_store.data.models import DTYPES
from prismoe_store.stores.formats import StoreOptions


def _spec_options(f):
    """The options shared by ``collect`` and ``benchmark collect``."""
    options = [
        click.option("--upper", required=True, metavar="MODEL",
                     help="Model giving x: a Hugging Face model folder or a .gguf file (local, offline)."),
        click.option("--lower", default=None, metavar="MODEL",
                     help="Model giving z (default: the upper model)."),
        click.option("--text", "texts", multiple=True, required=True, metavar="PATH",
                     help="Text file: one document per line, or .jsonl with a \"text\" field. Repeatable."),
        click.option("--layer", type=int, default=-1, show_default=True,
                     help="Upper hidden_states index (0 = embeddings, -1 = last, after the final norm)."),
        click.option("--target", type=click.Choice(TARGETS), default="logits", show_default=True,
                     help="z: lower logits, lower input embedding of the next token, a lower hidden state, or "
                          "none (hidden states only, to train a head adapter's gate)."),
        click.option("--lower-layer", type=int, default=-1, show_default=True,
                     help="Lower hidden_states index for --target hidden."),
        click.option("--pool", type=click.Choice(POOLS), default="none", show_default=True,
                     help="none: a pair per token; last / mean: a pair per document."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per forward pass."),
        click.option("--max-length", type=int, default=512, show_default=True,
                     help="Tokens per sequence (longer documents: windows, or truncated when pooling)."),
        click.option("--max-tokens", type=int, default=None,
                     help="Stop once the store holds this many upper-model tokens (re-run to add more)."),
        device_option("cpu, cuda, cuda:N or auto."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                     help="Compute dtype of the models (pairs are stored float32)."),
        click.option("--on-nonfinite", type=click.Choice(NONFINITE), default="error", show_default=True,
                     help="Pairs with NaN/Inf: stop with an error, drop them, or zero them (counted)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _spec(kw: dict) -> CollectSpec:
    return CollectSpec(layer=kw["layer"], target=kw["target"], lower_layer=kw["lower_layer"], pool=kw["pool"],
                       batch_size=kw["batch_size"], max_length=kw["max_length"], max_tokens=kw["max_tokens"],
                       device=kw["device"], dtype=kw["dtype"], on_nonfinite=kw["on_nonfinite"])


@click.command("collect")
@_spec_options
@click.option("-o", "--output", "--out", "out", required=True, metavar="PAIRS", callback=output_store,
              help="Pairs store to create or resume (--out is an older name).")
@overwrite_option("Replace an existing store instead of resuming it.")
@compressor_option("none", "Chunk codec of a new store (activations compress little: none writes and decodes fastest).")
@json_option("Print the report as one JSON object.")
@quiet_option
def collect_cmd(upper, lower, texts, out, overwrite, compressor, as_json, quiet, **kw):
    """Collect activation pairs (x: upper hidden states, z: the target) into a pairs store.

    Resumable: re-running the same command skips the documents already collected (and says so);
    a re-run with nothing left to collect stops before loading the model.
    """
    def notice(msg: str) -> None:
        if msg.startswith("resuming"):  # what this run continues: said with -q and --json too (on stderr)
            click.echo(msg, err=True)
        elif not (quiet or as_json) or not msg.startswith("loading "):
            click.echo(f"note: {msg}", err=True)

    with bar("collect", quiet=quiet or as_json, unit="tok", growing=True) as progress:
        report = collect(upper, lower, list(texts), out, spec=_spec(kw), overwrite=overwrite,
                         options=StoreOptions(compressor=compressor), progress=progress, notice=notice)
    if as_json:
        echo_json(report.as_dict())
        return
    if report.already_finished:  # the line below says why (complete, or the --max-tokens cap reached)
        click.echo(f"{out}: already finished, nothing to do")
    click.echo(format_collect(report))
    if report.nonfinite_rows:
        click.echo(f"{report.nonfinite_rows} pairs held NaN/Inf ({kw['on_nonfinite']})", err=True)


@click.command("collect")
@_spec_options
@click.option("--repeats", type=int, default=3, show_default=True, help="Alternating timed runs of each side.")
@compressor_option("zstd", "Chunk codec of the store collect writes.")
@json_option("Print the result as one JSON object.")
def collect_bench(upper, lower, texts, repeats, compressor, as_json, **kw):
    """Collection throughput (tokens/s) as a ratio to a bare forward pass of the same model(s)."""
    spec = _spec(kw)
    if spec.max_tokens is None:
        spec = replace(spec, max_tokens=20_000)
    result = benchmark_collect(upper, lower, list(texts), spec=spec, repeats=repeats,
                               options=StoreOptions(compressor=compressor))
    if as_json:
        echo_json(result)
        return
    click.echo(format_benchmark_collect(result))


@click.command("sample")
@model_option()
@prompt_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the texts (.jsonl).")
@click.option("--samples", type=click.IntRange(min=1), default=3, show_default=True, help="Continuations per prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True,
              help="Tokens sampled after each prompt.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.8, show_default=True,
              help="Softmax temperature.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Nucleus sampling: the smallest set of tokens holding this much probability.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The same prompts and settings give the same texts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts a call.")
@device_option()
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Compute dtype.")
@json_option()
@quiet_option
def sample_cmd(model, prompts, prompts_file, output, samples, max_new_tokens, temperature, top_p, seed, batch_size,
               device, dtype, as_json, quiet):
    """Write MODEL's sampled continuations of prompts as .jsonl documents: its own text, to collect
    hidden states from and train a head adapter's band gate on (a gate trained on one kind of text
    only routes other text worse; see docs/heads.md)."""
    from prismoe_store.data.sampling import SampleSpec, sample_line, sample_texts

    prompts = gather_prompts(prompts, prompts_file)
    spec = SampleSpec(samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed, batch_size=batch_size, device=device, dtype=dtype)
    with bar("sample", quiet=quiet or as_json, unit="text") as progress:
        r = sample_texts(model, prompts, output, spec=spec, progress=progress)
    if as_json:
        echo_json(r)
        return
    click.echo(sample_line(r, model))


commands = [collect_cmd, sample_cmd]
bench_commands = [collect_bench]
