"""Options defined the same way in several commands, one factory each, so their names, destinations
and types cannot drift apart. Each returns a click decorator; ``help`` says what the option does in
that command (the defaults are the common wording).

``--quiet`` lives with the progress bars it silences (:func:`cli.progress.quiet_option`), ``-o`` store
checking with the output helpers (:func:`cli.output.output_store`).
"""

from __future__ import annotations

import click

COMPRESSORS = ("none", "zstd", "blosc")  # chunk codecs of prismoe_store.stores.formats.StoreOptions


def json_option(help: str = "Print one JSON object instead of text."):
    """``--json`` (destination ``as_json``): machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def overwrite_option(help: str = "Replace an existing store instead of resuming it."):
    """``--overwrite``: replace the output instead of resuming or refusing."""
    return click.option("--overwrite", is_flag=True, help=help)


def device_option(help: str = "torch device: cpu, cuda, cuda:1, ..."):
    """``--device`` (default ``cpu``)."""
    return click.option("--device", default="cpu", show_default=True, help=help)


def plot_dir_option(*names: str, help: str):
    """``--plot`` / ``--plots`` (destination ``plot_dir``): a folder for PNG files, created if missing."""
    return click.option(*(names or ("--plots",)), "plot_dir", type=click.Path(file_okay=False), default=None,
                        help=help)


def compressor_option(default: str | None, help: str):
    """``--compressor``: the chunk codec of a store the command writes (``None``: the store's default)."""
    return click.option("--compressor", type=click.Choice(COMPRESSORS), default=default,
                        show_default=default is not None, help=help)


def model_option(help: str = "The model: a transformers causal-LM folder, a .gguf file, or a folder holding one "
                             "(read offline)."):
    """``--model`` (required, an existing path): the causal LM a command loads."""
    return click.option("--model", required=True, type=click.Path(exists=True), help=help)


def prompt_options(f):
    """``--prompt`` (repeatable, destination ``prompts``) and ``--prompts-file``; read them with
    :func:`gather_prompts`."""
    f = click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="More prompts, one per non-blank line.")(f)
    return click.option("--prompt", "prompts", multiple=True, help="Text to continue (repeatable).")(f)


def gather_prompts(prompts, prompts_file) -> list[str]:
    """The ``--prompt`` values, then the non-blank lines of ``--prompts-file``; a usage error when there are none."""
    out = list(prompts)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    if not out:
        raise click.UsageError("give --prompt TEXT (repeatable) or --prompts-file PATH")
    return out
