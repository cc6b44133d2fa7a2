"""Every ``prismoe`` command and group answers ``--help`` and documents every option."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from cli.main import main


def _walk(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    ctx = click.Context(group, info_name=path[-1] if path else "prismoe")
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, path + (name,))
        else:
            yield path + (name,), cmd


COMMANDS = list(_walk(main))


def test_there_are_commands():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"extract", "inspect", "compare", "visualize"} <= names


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[" ".join(p) or "prismoe" for p, _ in COMMANDS])
def test_help(path, cmd):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    assert (cmd.help or "").strip(), f"{' '.join(path) or 'prismoe'} has no help text"
    first_line = (cmd.help or "").strip().splitlines()[0]
    assert " ".join(first_line.split()) in " ".join(result.output.split())  # click re-wraps lines
    undocumented = [p.name for p in cmd.params
                    if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undocumented, f"options without help in {' '.join(path) or 'prismoe'}: {undocumented}"


SHARED = {  # option -> (destination, flag, default) wherever a command has it (cli/options.py, cli/progress.py)
    "--json": ("as_json", True, False),
    "--quiet": ("quiet", True, False),
    "--overwrite": ("overwrite", True, False),
    "--device": ("device", False, "cpu"),
}


def test_shared_options_mean_the_same_in_every_command():
    """An option that several commands take is defined alike in all of them (same destination, kind and
    default), so scripts can pass it the same way everywhere."""
    seen = dict.fromkeys(SHARED, 0)
    for path, cmd in COMMANDS:
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            for name in set(p.opts) & set(SHARED):
                dest, flag, default = SHARED[name]
                got = p.default is True if p.is_flag else p.default  # click 8.3 leaves a flag's default UNSET (off)
                assert (p.name, p.is_flag, got) == (dest, flag, default), (" ".join(path), name)
                seen[name] += 1
    assert all(n >= 3 for n in seen.values()), seen  # each is shared by several commands


def test_fit_gates_help_gives_the_defaults_of_both_kinds_of_adapter():
    """fit-gates trains a fitted adapter's gates or a head adapter's band gate, whose defaults differ:
    the help names both, as the two configs hold them (not one of them as click's [default: …])."""
    pytest.importorskip("torch")
    from prismoe_store.gates.settings import GateSettings
    from prismoe_store.head.band_gate import BandGateConfig

    cmd = main.commands["fit-gates"]
    ctx = click.Context(cmd, info_name="fit-gates")
    records = {p.name: p.get_help_record(ctx)[1] for p in cmd.params if isinstance(p, click.Option)}
    head = BandGateConfig()
    for name in ("sparsity", "epochs", "lr"):
        fitted, band = getattr(GateSettings, name), getattr(head, name)
        assert fitted != band
        assert f"[default: {fitted:g}; head adapters: {band:g}]" in records[name], records[name]
    assert "head adapters: 0.05" in records["holdout"] and head.holdout == 0.05
    assert f"head adapters: {head.seed})" in records["seed"]
    help_text = " ".join(CliRunner().invoke(main, ["fit-gates", "--help"]).output.split())
    assert "[default: 0.3; head adapters: 0.1]" in help_text and "[default: 30; head adapters: 10]" in help_text
    assert "[default: 0.01; head adapters: 0.002]" in help_text
