"""``prismoe fit-gates``, ``prismoe routing`` and ``prismoe benchmark gates``: phase 2 of the adapter.

The reports and their text are :mod:`prismoe_store.gates.report` and
:mod:`prismoe_store.gates.training`; ``prismoe inspect ADAPTER --routing PAIRS`` calls them the same way
``prismoe routing`` does.
"""

from __future__ import annotations

import functools

import click

from cli.options import device_option, json_option, plot_dir_option
from cli.output import echo_json, note_input_layer, open_adapter
from cli.progress import bar, quiet_option, stage_bars
from prismoe_store.gates import settings as S


def _gates():
    """The training module, imported on use (it needs torch)."""
    from prismoe_store.gates import training as gates

    return gates


def _report():
    """The routing / quality report module, imported on use (it needs torch)."""
    from prismoe_store.gates import report as gate_report

    return gate_report


def _sparsities(ctx, param, value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not out or any(not 0 < v <= 1 for v in out):
        raise click.BadParameter(f"each sparsity must be in (0, 1], got {value!r}")
    return out


def _both_defaults(name: str) -> str:
    """``[default: 0.3; head adapters: 0.1]``: an option of fit-gates whose default depends on the
    adapter (a fitted adapter's gates, :class:`GateSettings`; a head adapter's band gate, :data:`BAND_GATE`)."""
    fitted, head = getattr(S.GateSettings, name), getattr(S.BAND_GATE, name)
    return f"[default: {fitted:g}" + (f"; head adapters: {head:g}]" if head != fitted else ", head adapters too]")


def _split_options(f, *, head: bool = False):
    head_seed = f"; head adapters: {S.BAND_GATE.seed}" if head else ""
    head_holdout = f"; head adapters: {S.BAND_GATE.holdout:g}" if head else ""
    f = click.option("--seed", type=click.IntRange(min=0), default=None,
                     help=f"Seed of the held-out split (default: the adapter's fit{head_seed}).")(f)
    f = click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                     help=f"Share of rows held out (default: the adapter's fit, else 0.1{head_holdout}).")(f)
    return f


def _common_options(f):
    f = click.option("--max-tile-mb", type=click.FloatRange(min=1), default=S.DEFAULT_MAX_TILE_BYTES / 2**20,
                     show_default=True, help="Memory budget for the tiles (held whole) and one minibatch.")(f)
    return device_option()(f)


_HEAD_OPTIONS = ("sparsity", "epochs", "lr", "batch_size")  # fit-gates options a head adapter's band gate reads


def _training_options(f, *, head: bool = False):
    """The gate-training options; ``head``: those a head adapter also reads show both defaults (their
    click default is None: the command fills in the one of the adapter's kind)."""
    d = S.GateSettings
    for name, typ, default, hlp in reversed([
        ("--epochs", click.IntRange(min=0), d.epochs, "Maximum passes over the training rows."),
        ("--lr", click.FloatRange(min=0, min_open=True), d.lr, "Adam learning rate."),
        ("--batch-size", click.IntRange(min=1), d.batch_size, "Rows per minibatch."),
        ("--balance-coef", click.FloatRange(min=0), d.balance_coef, "Weight of the load-balancing loss."),
        ("--z-loss-coef", click.FloatRange(min=0), d.z_loss_coef, "Weight of the router z-loss."),
        ("--temperature", click.FloatRange(min=0, min_open=True), d.temperature,
         "Softmax temperature of the selected scores (stored for the runtime)."),
        ("--patience", click.IntRange(min=0), d.patience, "Epochs without held-out improvement before stopping "
                                                           "(0: never stop early)."),
    ]):
        key = name[2:].replace("-", "_")
        if head and key in _HEAD_OPTIONS:
            if key == "epochs":
                hlp = hlp[:-1] + "; left out on a re-run, the saved run's (a larger value continues it)."
            f = click.option(name, type=typ, default=None, help=f"{hlp}  {_both_defaults(key)}")(f)
        else:
            f = click.option(name, type=typ, default=default, show_default=True, help=hlp)(f)
    return f


@click.command("fit-gates")
@click.argument("adapter")
@click.argument("pairs")
@click.option("--sparsity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"ρ: share of each pipe's active tiles a token uses (K = round(ρ·n)).  {_both_defaults('sparsity')}")
@functools.partial(_training_options, head=True)
@click.option("--init", type=click.Choice(S.INITS), default=S.GateSettings.init, show_default=True,
              help="Gate initialisation (see docs/gates.md).")
@functools.partial(_split_options, head=True)
@click.option("--restart", is_flag=True, help="Start over instead of resuming a saved run (options left out keep "
                                                 "the saved run's values).")
@_common_options
@json_option()
@quiet_option
def fit_gates_cmd(adapter, pairs, sparsity, epochs, lr, batch_size, balance_coef, z_loss_coef, temperature,
                  patience, init, holdout, seed, restart, device, max_tile_mb, as_json, quiet):
    """Train the gates of ADAPTER's pipes on PAIRS, tiles frozen; write them into ADAPTER.

    Resumes from the last saved epoch when re-run with the same settings; a finished run is a no-op.
    Options left out take the saved run's values, with --restart too (it starts over with the
    saved settings and names those that are not the defaults); a larger --epochs continues a
    finished run; other settings given that differ from the saved run's are refused unless --restart.

    For a head adapter (`prismoe head`), PAIRS holds hidden states only (a store from `prismoe
    collect --target none`, any pairs store's x, or a .npy): the band gate learns the head's
    band-mass distribution, computed from the tiles on the fly. Of the options, --sparsity,
    --epochs, --lr, --batch-size, --holdout, --seed, --restart and --device apply (with the head
    adapters' defaults each option names).
    """
    store = open_adapter(adapter, pairs, mode="r+")
    head = store.layout == "partition"
    ctx = click.get_current_context()
    if head:
        _refuse_fitted_only(ctx)
    talk = not (quiet or as_json)
    opts = dict(sparsity=sparsity, epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout, seed=seed)
    if not head:
        opts.update(balance_coef=balance_coef, z_loss_coef=z_loss_coef, temperature=temperature, init=init,
                    patience=patience)
    kept = _keep_saved_settings(ctx, store, head, opts)  # options left out: the saved run's (a restart too)
    if restart and kept and talk:
        click.echo(f"--restart keeps the saved run's {kept} (options given here replace them)", err=True)
    log = (lambda line: click.echo(line, err=True)) if talk else None  # resuming / continuing, once checked
    given = {name: value for name, value in opts.items() if value is not None}
    if head:
        _fit_band_gate(store, pairs, given, restart, device, as_json, quiet, talk, log)
        return
    config = S.GateSettings(**given)
    with bar("fit-gates", quiet=quiet, unit="row") as progress:
        r = _gates().fit_gates(adapter, pairs, config, restart=restart, device=device,
                               max_tile_bytes=int(max_tile_mb * 2**20), progress=progress, log=log)
    if as_json:
        echo_json(r)
        return
    if r["status"] == "already finished":
        click.echo(f"gates of {adapter}: {FINISHED}")
    click.echo(_gates().format_fit_gates(r))


FINISHED = "already finished, nothing to do (--restart trains again)"
_FITTED_ONLY = ("balance_coef", "z_loss_coef", "temperature", "patience", "init", "max_tile_mb")  # not for heads


def _refuse_fitted_only(ctx: click.Context) -> None:
    """A head adapter's band gate reads none of the fitted gates' options: one given on the command
    line is refused (its default is not a choice the user made, so it passes)."""
    from click.core import ParameterSource

    from prismoe_store.errors import DataError

    given = [p for p in ctx.command.params if p.name in _FITTED_ONLY
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        names = ", ".join(p.opts[0] for p in given)
        raise DataError(f"{names} {'does' if len(given) == 1 else 'do'} not apply to a head adapter (its band gate "
                        "reads --sparsity, --epochs, --lr, --batch-size, --holdout, --seed, --restart, --device)")


def _keep_saved_settings(ctx: click.Context, store, head: bool, opts: dict) -> str:
    """Fill ``opts`` with the saved run's settings (:func:`~prismoe_store.gates.settings.reused_settings`)
    for the options not given on the command line; returns those that differ from what this run
    would otherwise use, as flags ("--sparsity 0.2, --lr 0.005"), or ""."""
    from click.core import ParameterSource

    from prismoe_store.errors import StoreError

    try:
        saved = store.gate_settings()
    except StoreError:  # an unreadable record: nothing to keep (the run says what is wrong)
        return ""
    left_out = [name for name in opts if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None)]
    reused = S.reused_settings(saved, [*left_out, *(() if head else ("init_rows", "init_scale"))], head=head)
    defaults = S.BAND_GATE if head else S.GateSettings()
    fit = None if head else store.fit_record()
    split = {"holdout": fit.holdout, "seed": fit.seed} if fit is not None else {"holdout": 0.1, "seed": 0}
    changed = []
    for name, value in reused.items():
        before = opts.get(name)
        if before is None:  # left out: the kind's default (a fitted adapter's split: its fit's)
            before = split[name] if not head and name in split else getattr(defaults, name)
        if value != before:
            flag = f"--{name.replace('_', '-')} " if name in opts else f"{name}="
            changed.append(flag + (f"{value:g}" if isinstance(value, float) else str(value)))
        opts[name] = value
    return ", ".join(changed)


def _fit_band_gate(store, hidden, given: dict, restart: bool, device: str, as_json: bool, quiet: bool,
                   talk: bool, log) -> None:
    """Train a head adapter's band gate; ``talk``: say what comes first; ``log``: resuming / continuing."""
    from prismoe_store.head.band_gate import BandGateConfig, fit_band_gate

    config = BandGateConfig(restart=restart, device=device, **given)
    note_input_layer(hidden, store)
    bars = stage_bars(quiet or as_json, {"teacher pass": "row"}, default_unit="epoch")

    def stages(name: str):  # the note comes when the teacher pass starts: after the checks, never for a no-op
        if talk and name == "teacher pass":
            click.echo("note: teacher pass first: the full head scores every hidden state once and keeps each "
                       f"band's share of the probability (the gate's targets); then up to {config.epochs} epoch"
                       f"{'s' * (config.epochs != 1)}",
                       err=True)
        return bars(name)

    r = fit_band_gate(store, hidden, config=config, stages=stages, log=log)
    if as_json:
        echo_json(r.to_dict())
        return
    if r.status == "already finished":
        click.echo(f"band gate of {store.url}: {FINISHED}")
    b, a = r.before, r.after
    timing = "" if r.status == "already finished" else (f"; teacher pass {r.teacher_seconds:.1f} s, "
                                                         f"{r.seconds_per_epoch:.1f} s per epoch")
    if r.status == "resumed":  # said with --quiet too, as the fitted gates' summary does
        click.echo(f"resumed from epoch {r.resumed_from}")
    click.echo(f"band gate: {r.rows} hidden-state rows ({r.held_out} held out), {r.epochs} epoch"
               f"{'s' * (r.epochs != 1)}, {_gates().best_epoch_text(r.best_epoch, r.epochs)}{timing}")
    click.echo(f"held-out at ρ = {config.sparsity}: top-1 band recall {b['top1']:.4f} → {a['top1']:.4f}, "
               f"mass kept {b['mass']:.4f} → {a['mass']:.4f}")


@click.command("routing")
@click.argument("adapter")
@click.argument("pairs")
@click.option("--sparsity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="ρ for the statistics (default: the one the gates were trained with).")
@click.option("--no-quality", is_flag=True, help="Statistics only, no quality table.")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Use at most this many held-out rows.")
@_split_options
@_common_options
@plot_dir_option("--plot", help="Write utilization heatmaps and histograms (PNG) into this folder.")
@json_option()
@quiet_option
def routing_cmd(adapter, pairs, sparsity, no_quality, max_rows, holdout, seed, device, max_tile_mb, plot_dir,
                as_json, quiet):
    """Routing statistics and held-out quality of ADAPTER's trained gates on PAIRS."""
    with bar("routing", quiet=quiet, unit="row") as progress:
        report = _report().routing_report(adapter, pairs, sparsity=sparsity, quality=not no_quality,
                                          holdout=holdout, seed=seed, max_rows=max_rows, device=device,
                                          max_tile_bytes=int(max_tile_mb * 2**20), progress=progress)
    if plot_dir:
        report["plots"] = _report().plot_routing(report, plot_dir)
        if "quality" in report:
            report["plots"].append(_report().plot_quality(report["quality"], plot_dir))
    if as_json:
        echo_json(report)
        return
    click.echo(_report().format_routing(report))
    for path in report.get("plots", []):
        click.echo(f"wrote {path}")


@click.command("gates")
@click.argument("adapter")
@click.argument("pairs")
@click.option("--sparsities", default=",".join(map(str, S.SPARSITIES)), show_default=True, callback=_sparsities,
              help="Comma-separated ρ values; one gate is trained per value.")
@_training_options
@click.option("--max-eval-rows", type=click.IntRange(min=1), default=None, help="Cap on held-out rows per evaluation.")
@_split_options
@_common_options
@plot_dir_option("--plots", help="Write quality.png (error against ρ per gate) into this folder.")
@json_option()
@quiet_option
def bench_gates_cmd(adapter, pairs, sparsities, epochs, lr, batch_size, balance_coef, z_loss_coef, temperature,
                    patience, max_eval_rows, holdout, seed, device, max_tile_mb, plot_dir, as_json, quiet):
    """Quality table: zero, initialised and trained gates at each ρ beside the dense baselines.

    Trains one gate per ρ in memory; ADAPTER is not changed.
    """
    config = S.GateSettings(epochs=epochs, lr=lr, batch_size=batch_size, balance_coef=balance_coef,
                            z_loss_coef=z_loss_coef, temperature=temperature, patience=patience, holdout=holdout,
                            seed=seed)
    with bar("benchmark gates", quiet=quiet, unit="row") as progress:
        q = _report().benchmark_gates(adapter, pairs, config, sparsities=sparsities, device=device,
                                      max_tile_bytes=int(max_tile_mb * 2**20), max_eval_rows=max_eval_rows,
                                      progress=progress)
    if plot_dir:
        q["plots"] = [_report().plot_quality(q, plot_dir)]
    if as_json:
        echo_json(q)
        return
    click.echo(_report().format_benchmark_gates(q))
    for path in q.get("plots", []):
        click.echo(f"wrote {path}")


commands = [fit_gates_cmd, routing_cmd]
bench_commands = [bench_gates_cmd]
