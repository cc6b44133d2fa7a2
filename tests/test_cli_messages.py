"""What the CLI says: errors as one line without class names (closest names first), the padding
warning with a suggested worker count, pairs-info's readable provenance, fit settings left at
their defaults, ``--output`` as collect's option name."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_safetensors
from interrupts import Interrupted, at_first_work

from cli.main import main
from cli.messages import INTERRUPTED_EXIT, MAX_CHARS, RESUMABLE, error_line
from prismoe_store.errors import DataError, IncompleteStoreError, TensorNotFoundError
from prismoe_store.grid import padding_advice, plan_pipes
from prismoe_store.stores.pairs import PairsStore


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_missing_tensor_is_one_short_line_with_the_closest_names_first(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((4, 4)) for i in range(60)}
    tensors["lm_head.weight"] = rng.standard_normal((8, 4))
    path = write_safetensors(tmp_path / "m.safetensors", tensors)
    r = _run("extract", path, "-o", tmp_path / "w.zarr", "--tensor", "lm_haed.weight")
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith("Error: no tensor 'lm_haed.weight'") and "TensorNotFoundError" not in line
    assert line.index("lm_head.weight") < line.index("model.layers")  # the closest name leads the listing
    assert "61 tensors" in line and len(line) < MAX_CHARS + 150  # not the ~4000 characters of all 61 names
    assert "--tensor" in line  # what to do


def test_error_line_shortens_and_adds_a_hint_only_when_missing():
    long = TensorNotFoundError("no tensor 'x' in m; it has " + ", ".join(f"t{i}" for i in range(500)))
    text = error_line(long)
    assert len(text) < MAX_CHARS + 120 and "\n" not in text and " … " in text and "--tensor" in text
    assert text.startswith("no tensor 'x' in m; it has t0, t1") and "t499 — name one" in text  # both ends kept
    ends_with_advice = IncompleteStoreError("x" * 1000 + ": re-run it or pass --overwrite")
    assert error_line(ends_with_advice).endswith("re-run it or pass --overwrite")
    told = IncompleteStoreError("head adapter h.zarr is not finished: re-run `prismoe head` first")
    assert error_line(told) == str(told)
    assert error_line(IncompleteStoreError("x.zarr is not finished")).endswith("or pass --overwrite")


def test_padding_advice_counts_the_tiles_the_planner_makes():
    assert padding_advice(64, 256, 512) is None
    line = padding_advice(576, 49152, 512)
    p1, _, p3 = plan_pipes(576, 49152, 512)
    assert f"in each of pipes 1 and 2, {p1.workers - p1.active_count} of its 512 tiles hold only padding" in line
    assert f"pipe 3: {p3.workers - p3.active_count} of 512" in line
    assert f"{p1.active_count} tiles of the pipe do work" in line
    suggested = int(line.split("use --workers ")[1].split()[0])
    assert plan_pipes(576, 49152, suggested)[0].active_count >= 512  # the suggestion gives what it says
    # fewer workers do not help a width just above a power of 2: the line says so rather than suggest them
    line = padding_advice(576, 576, 512)
    assert "Fewer --workers do not remove it (at --workers 128 the share is still 64.8%)" in line
    assert "use --workers 2048 (648 of pipe 1's do work)" in line
    # where fewer workers do help, the line names them
    line = padding_advice(12, 100, 64)
    assert line is not None and "--workers 32 leaves 25.0% padding-only tiles" in line, line


def test_fit_warns_about_padding_and_inspect_reads_defaults(tmp_path):
    url = str(tmp_path / "p.zarr")
    store = PairsStore.create(url, d_in=24, d_out=40)
    x = np.random.default_rng(1).standard_normal((300, 24)).astype(np.float32)
    store.append(x, x @ np.random.default_rng(2).standard_normal((24, 40)).astype(np.float32))
    r = CliRunner().invoke(main, ["fit", url, "-o", str(tmp_path / "a.zarr"), "--workers", "64", "-q"])
    assert r.exit_code == 0, r.output
    assert "warning: " in r.stderr and "hold only padding" in r.stderr and "--workers" in r.stderr
    # a refused fit prints its error alone: the warning comes once the fit's checks have passed
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.md").write_text("mine")
    r = CliRunner().invoke(main, ["fit", url, "-o", str(tmp_path / "notes"), "--workers", "64"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"Error: {tmp_path / 'notes'} already exists and is not an adapter")
    # a resumed fit says it resumes, not the padding again (its first run said that)
    from prismoe_store.fit import FitConfig, fit

    with pytest.raises(Interrupted):
        fit(url, str(tmp_path / "b.zarr"), FitConfig(workers=64, block_rows=64), scheduler="synchronous",
            progress=at_first_work)
    r = CliRunner().invoke(main, ["fit", url, "-o", str(tmp_path / "b.zarr"), "--workers", "64", "--block-rows", "64",
                                  "-q"])
    assert r.exit_code == 0 and "resuming: " in r.stderr and "hold only padding" not in r.stderr, r.output
    r = _run("inspect", tmp_path / "a.zarr", "--no-stats")
    fit_line = next(line for line in r.output.splitlines() if line.strip().startswith("fit:"))
    assert "ridge auto" in fit_line and "alphas equal" in fit_line and "None" not in fit_line


def test_pairs_info_shows_hidden_only_stores_and_nested_provenance(tmp_path):
    url = str(tmp_path / "h.zarr")
    store = PairsStore.create(url, d_in=8, d_out=0)
    store.append(np.ones((5, 8), np.float32), np.zeros((5, 0), np.float32),
                 provenance={"kind": "collected", "upper": {"path": "m.gguf", "hidden_size": 8}})
    r = _run("pairs-info", url)
    assert r.exit_code == 0, r.output
    assert "hidden states only" in r.output and "{" not in r.output
    assert "  upper:\n    path: m.gguf\n    hidden_size: 8" in r.output


@pytest.mark.parametrize("flag", ["--output", "-o", "--out"])
def test_collect_takes_output_like_every_command(flag):
    from cli.collect_cmds import collect_cmd

    option = next(p for p in collect_cmd.params if p.name == "out")
    assert flag in option.opts


def _ctrl_c_at_the_third_append(monkeypatch):
    """Make the third ``PairsStore.append`` raise KeyboardInterrupt (as Ctrl-C there would);
    returns the real ``append``, to put back."""
    real_append, calls = PairsStore.append, []

    def append_then_ctrl_c(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_append(self, *a, **kw)

    monkeypatch.setattr(PairsStore, "append", append_then_ctrl_c)
    return real_append


def test_ctrl_c_says_the_work_is_kept_and_the_rerun_finishes_it(tmp_path, monkeypatch):
    """Ctrl-C in a resumable command: one line (not click's "Aborted!"), exit 130, and the line's
    promise holds: the same command run again finishes the store, equal to an uninterrupted one."""
    args = ["synth", "--rows", 700, "--d-in", 6, "--d-out", 5, "--rows-per-chunk", 100, "-q"]
    real_append = _ctrl_c_at_the_third_append(monkeypatch)
    cut = _run(*args, "-o", tmp_path / "cut.zarr")
    monkeypatch.setattr(PairsStore, "append", real_append)
    assert cut.exit_code == INTERRUPTED_EXIT == 130
    assert cut.output.strip().splitlines() == [
        "interrupted: the work finished so far is kept; run the same command again to continue it"]
    assert PairsStore.open(tmp_path / "cut.zarr").rows == 200  # the two chunks before Ctrl-C
    assert _run(*args, "-o", tmp_path / "cut.zarr").exit_code == 0
    assert _run(*args, "-o", tmp_path / "whole.zarr").exit_code == 0
    a, b = PairsStore.open(tmp_path / "cut.zarr"), PairsStore.open(tmp_path / "whole.zarr")
    assert a.rows == b.rows == 700
    for u, v in zip(a.read(0, 700), b.read(0, 700)):
        np.testing.assert_array_equal(u, v)


def test_ctrl_c_of_a_command_that_starts_over_says_to_drop_the_flag(tmp_path, monkeypatch):
    """Ctrl-C of a run with --overwrite (or --restart): the same command again would start over, so
    the line says to run it without the flag; that re-run finishes the store (it keeps the rows
    written before Ctrl-C), equal to an uninterrupted one."""
    args = ["synth", "--rows", 700, "--d-in", 6, "--d-out", 5, "--rows-per-chunk", 100, "-q"]
    PairsStore.create(tmp_path / "cut.zarr", d_in=3, d_out=2)  # something to overwrite
    real_append = _ctrl_c_at_the_third_append(monkeypatch)
    cut = _run(*args, "-o", tmp_path / "cut.zarr", "--overwrite")
    monkeypatch.setattr(PairsStore, "append", real_append)
    assert cut.exit_code == INTERRUPTED_EXIT
    assert cut.output.strip().splitlines() == [
        "interrupted: the work finished so far is kept; run the command again without --overwrite to continue it "
        "(with --overwrite it starts over)"]
    assert PairsStore.open(tmp_path / "cut.zarr").rows == 200
    appended = []
    monkeypatch.setattr(PairsStore, "append", lambda self, x, z, *a, **kw: (appended.append(len(x)),
                                                                             real_append(self, x, z, *a, **kw))[1])
    assert _run(*args, "-o", tmp_path / "cut.zarr").exit_code == 0
    assert sum(appended) == 500  # continued: only the rows left
    assert _run(*args, "-o", tmp_path / "whole.zarr").exit_code == 0
    a, b = PairsStore.open(tmp_path / "cut.zarr"), PairsStore.open(tmp_path / "whole.zarr")
    for u, v in zip(a.read(0, 700), b.read(0, 700)):
        np.testing.assert_array_equal(u, v)


def test_a_refused_setting_is_named_by_its_flag(tmp_path):
    """"workers must be a power of 2" did not say which option: the CLI names the flag that set it."""
    assert _run("synth", "-o", tmp_path / "p.zarr", "--rows", 300, "--d-in", 8, "--d-out", 6, "-q").exit_code == 0
    for args in (["fit", tmp_path / "p.zarr", "-o", tmp_path / "a.zarr", "--workers", 100],
                 ["synth", "-o", tmp_path / "g.zarr", "--rows", 10, "--d-in", 4, "--d-out", 4, "--kind", "gated",
                  "--workers", 100]):
        r = _run(*args)
        assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
            "Error: --workers must be a power of 2, got 100"], r.output
    r = _run("fit", tmp_path / "p.zarr", "-o", tmp_path / "a.zarr", "--holdout", 5)
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == ["Error: --holdout must be in [0, 1), got 5.0"]
    assert error_line(DataError("workers must be a power of 2, got 100")) == "workers must be a power of 2, got 100"


def test_a_damaged_tile_names_its_pipe_as_its_folder_does(tmp_path):
    """Messages number pipes from 1, as the folders pipe1..pipe3 and inspect do (a damaged tile of
    pipe2 was "pipe 1")."""
    assert _run("synth", "-o", tmp_path / "p.zarr", "--rows", 300, "--d-in", 8, "--d-out", 6, "-q").exit_code == 0
    assert _run("fit", tmp_path / "p.zarr", "-o", tmp_path / "a.zarr", "--workers", 4, "-q").exit_code == 0
    from prismoe_store.errors import CorruptStoreError
    from prismoe_store.stores.adapter import AdapterStore

    AdapterStore.open(str(tmp_path / "a.zarr"), "r+").tiles(1)[0, 0] = np.nan  # written whole, but not finite
    a = AdapterStore.open(str(tmp_path / "a.zarr"))
    for read, what in ((lambda: a.read_tile(1, 0), "tile 0"), (lambda: a.read_band(1, 0), "band 0"),
                       (lambda: a.dense(1), "tiles")):
        with pytest.raises(CorruptStoreError, match=f"^{what} of pipe 2 in .* holds NaN or Inf$"):
            read()
    # fit-gates refuses such tiles as damage (it trained, "diverged" and said "lower --lr", after a torch warning)
    r = _run("fit-gates", tmp_path / "a.zarr", tmp_path / "p.zarr", "--epochs", 1, "-q")
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"Error: tiles of pipe 2 in {tmp_path / 'a.zarr'} holds NaN or Inf"], r.output


def test_ctrl_c_in_a_command_that_does_not_resume_promises_nothing(tmp_path, monkeypatch):
    PairsStore.create(tmp_path / "p.zarr", d_in=3, d_out=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PairsStore, "open", interrupted)
    r = _run("pairs-info", tmp_path / "p.zarr")
    assert r.exit_code == 130 and r.output.strip().splitlines() == ["interrupted"]


def test_the_resumable_commands_are_commands_that_say_they_resume():
    for name in RESUMABLE:
        cmd = main.commands[name]
        text = (cmd.help or "").lower()
        assert any(w in text for w in ("resum", "re-run", "finishes the rest")), name
    for name, cmd in main.commands.items():  # and no command that says it resumes is left out
        if "resum" in (cmd.help or "").lower() or "re-running" in (cmd.help or "").lower():
            assert name in RESUMABLE, name


def test_a_closed_output_pipe_ends_the_command_quietly():
    """`prismoe … | head -1`: when the reader goes away the command stops without an error line."""
    import subprocess
    import sys

    code = ("import click, sys\n"
            "from cli.main import main\n"
            "@click.command('spew')\n"
            "def spew():\n"
            "    for i in range(10**6):\n"
            "        click.echo(f'line {i} ' + 'x' * 60)\n"
            "main.add_command(spew)\n"
            "sys.argv = ['prismoe', 'spew']\n"
            "run()\n")  # as the console script does
    code = code.replace("import main", "import main, run")
    p = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True, text=True,
                       executable="/bin/bash")
    assert p.stdout == "line 0 " + "x" * 60 + "\n"
    assert p.stderr == "", p.stderr
    # a reader that takes everything gets everything: the immediate exit comes after the flush
    p = subprocess.run(f"set -o pipefail; {sys.executable} -c \"{code}\" | wc -l", shell=True, capture_output=True,
                       text=True, executable="/bin/bash")
    assert (p.returncode, p.stdout.strip(), p.stderr) == (0, str(10 ** 6), "")


def test_the_console_script_leaves_at_once_after_ctrl_c(monkeypatch, capsys):
    """After the one line, `prismoe` exits without tearing down the interrupted job's threads (whose
    teardown printed hundreds of asyncio lines when Ctrl-C hit Zarr's I/O); so do finished commands,
    with their exit code, unless they left child processes running."""
    import multiprocessing

    import cli.main as cli_main

    left = []

    def fake_exit(code):
        left.append(code)
        raise RuntimeError("left")

    def exits(code):
        def command():
            print("printed")
            raise SystemExit(code)
        return command

    monkeypatch.setattr(cli_main.os, "_exit", fake_exit)
    for code, expected in [(INTERRUPTED_EXIT, 130), (1, 1), (0, 0), (None, 0)]:
        monkeypatch.setattr(cli_main, "main", exits(code))
        with pytest.raises(RuntimeError, match="left"):
            cli_main.run()
        assert left[-1] == expected
    assert capsys.readouterr().out == "printed\n" * 4

    monkeypatch.setattr(cli_main, "main", lambda: None)  # a command that returns
    with pytest.raises(RuntimeError, match="left"):
        cli_main.run()
    assert left[-1] == 0

    monkeypatch.setattr(cli_main, "main", exits("a message"))  # printed by Python, exit 1
    with pytest.raises(SystemExit) as e:
        cli_main.run()
    assert e.value.code == "a message"

    monkeypatch.setattr(multiprocessing, "active_children", lambda: ["a worker"])
    monkeypatch.setattr(cli_main, "main", exits(0))  # children left: the normal exit cleans them up
    with pytest.raises(SystemExit) as e:
        cli_main.run()
    assert e.value.code == 0 and len(left) == 5


def test_refusals_name_the_cli_flag_only(tmp_path):
    """The library says "pass overwrite=True / --overwrite"; the CLI shows "--overwrite" only."""
    from prismoe_store.fit import FitConfig, fit

    url = str(tmp_path / "p.zarr")
    store = PairsStore.create(url, d_in=8, d_out=16)
    x = np.random.default_rng(1).standard_normal((600, 8)).astype(np.float32)
    store.append(x, x @ np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32))
    assert _run("fit", url, "-o", tmp_path / "a.zarr", "--workers", "8", "-q").exit_code == 0
    r = _run("fit", url, "-o", tmp_path / "a.zarr", "--workers", "8", "--ridge", "0.5", "-q")
    assert r.exit_code == 1 and r.output.strip().endswith("finished fit with other settings (ridge) "
                                                          "(pass --overwrite to refit)"), r.output

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):  # an unfinished fit
        fit(url, str(tmp_path / "b.zarr"), FitConfig(workers=8), scheduler="synchronous", progress=stop)
    r = _run("fit", url, "-o", tmp_path / "b.zarr", "--workers", "8", "--ridge", "0.5", "-q")
    assert r.exit_code == 1 and "unfinished fit" in r.output and "overwrite=True" not in r.output
    assert r.output.strip().endswith("(pass --overwrite to start over)"), r.output


def test_a_bar_starts_where_the_job_is(capsys):
    """A resumed job's first tick reports the work already done: its bar starts there, not at 0."""
    from cli.progress import bar

    with bar("fit", unit="unit") as update:
        assert update is not None
        update(642, 1092)
        update(700, 1092)
    err = capsys.readouterr().err
    assert "642/1092" in err and "0/1092" not in err.replace("700/1092", "").replace("642/1092", "")
