"""The docs are true: docs/cli.md is exactly what scripts/gen_cli_docs.py writes from the click app
now, and every code block of README.md and docs/*.md runs as written (see below)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent
FIX = "docs/cli.md is stale: run `python scripts/gen_cli_docs.py` and commit the result"


def _script():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paths(group: click.Group, prefix: str = "prismoe"):
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd.hidden:
            continue
        yield f"{prefix} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _paths(cmd, f"{prefix} {name}")


def test_cli_md_is_current():
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == _script().render(), FIX


def test_every_command_and_option_is_documented():
    text = _script().render()
    assert text.startswith("# `prismoe` command reference")
    for path, cmd in _paths(main):
        assert f"\n## {path}\n" in text, path
        assert f"{path} [OPTIONS]" in text, path
        section = text.split(f"\n## {path}\n", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            if isinstance(p, click.Option) and "--help" not in p.opts and not p.hidden:
                assert f"`{p.opts[0]}" in section or f", {p.opts[0]}" in section, (path, p.opts)


def test_check_flag(tmp_path, capsys):
    script = _script()
    out = tmp_path / "cli.md"
    assert script.main(["-o", str(out)]) == 0
    assert script.main(["--check", "-o", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert script.main(["--check", "-o", str(out)]) == 1
    assert "python scripts/gen_cli_docs.py" in capsys.readouterr().err


def test_markdown_escaping():
    md = _script()._md
    assert md("max |A - B| <= atol, x*y, lm_head, _private") == \
        "max \\|A - B\\| &lt;= atol, x\\*y, lm_head, \\_private"


# -- every code block of README.md and docs/*.md runs -----------------------------------------
#
# Fenced blocks are tagged: ``bash`` and ``python`` blocks are code, ``text`` blocks are pictures,
# printed output or usage lines. Code blocks run in order, one working folder per file, in a
# "world" that holds the files the docs name (a tiny Llama as model-folder/, ~/models/..., a GGUF
# as model.gguf, texts as train.jsonl, ...): `prismoe` lines through the click app in this process,
# python blocks with exec. docs/results.md and docs/gates.md hold records of measurement runs
# that take minutes to hours on real models: their command lines are parsed against the CLI
# (every command and option must exist and take the values given), not run.

FENCE = re.compile(r"^```(\S*)\s*$")
CODE_TAGS = {"bash", "python"}
TAGS = CODE_TAGS | {"text"}
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
RECORDS = {"docs/results.md", "docs/gates.md"}  # measurement records: parsed, not run
NOT_RUN = {"pip", "pytest"}  # environment set-up (the fresh-venv check in CI does these)


def blocks(rel: str) -> list[tuple[str, int, str]]:
    """``(tag, first line, text)`` of every fenced block of ``rel``."""
    out, tag, start, buf = [], None, 0, []
    for n, line in enumerate((ROOT / rel).read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if tag is None and m:
            tag, start, buf = m.group(1), n, []
        elif tag is not None and line.strip() == "```":
            out.append((tag, start, "\n".join(buf)))
            tag = None
        elif tag is not None:
            buf.append(line)
    assert tag is None, f"{rel}: unclosed block at line {start}"
    return out


def commands(text: str) -> list[tuple[list[str], str]]:
    """Simple commands of a bash block: ``(argv, how)`` with how ``"&&"``/``";"`` or ``"&"``
    (background); env assignments stay in argv, ``> file`` stays as two tokens."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        argv: list[str] = []
        for tok in lex:
            if tok in ("&&", ";", "&"):
                if argv:
                    out.append((argv, tok))
                argv = []
            else:
                argv.append(tok)
        if argv:
            out.append((argv, ";"))
    return out


def test_every_block_is_tagged():
    for rel in DOCS:
        for tag, line, _ in blocks(rel):
            assert tag in TAGS, f"{rel}:{line}: tag the block as one of {sorted(TAGS)} (got {tag!r})"


def test_the_docs_have_code_to_run():
    runnable = {rel: sum(t in CODE_TAGS for t, _, _ in blocks(rel)) for rel in DOCS}
    for rel in ("README.md", "docs/guide.md", "docs/heads.md"):
        assert runnable[rel] >= 2, rel
    assert any(t == "python" for t, _, _ in blocks("README.md"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files the docs name, built small and real."""
    pytest.importorskip("transformers")
    from tiny_models import corpus_lines, save_llama, write_llama_gguf, write_texts

    w = tmp_path_factory.mktemp("world")
    llama = save_llama(w / "llama")
    tied = save_llama(w / "tied", tie_embeddings=True, seed=1)
    home = w / "home"
    for name in ("upper", "lower", "Llama-3.2-1B"):
        (home / "models").mkdir(parents=True, exist_ok=True)
        os.symlink(llama, home / "models" / name)
    gguf = write_llama_gguf(tied, w / "model.gguf")
    texts = {"train.jsonl": corpus_lines(60, seed=1), "held.jsonl": corpus_lines(30, seed=2),
             "corpus.jsonl": corpus_lines(40, seed=3), "notes.txt": corpus_lines(10, seed=4),
             "prompts.txt": ["The model reads", "A tile of the"]}
    files = {n: write_texts(w / n, docs) for n, docs in texts.items()}
    return {"root": w, "home": home, "llama": llama, "gguf": gguf, "files": files}


def _furnish(world, cwd: Path) -> None:
    """Put the named files into a working folder."""
    for name in ("model-folder", "upper-model", "lower-model", "path/to/model-folder"):
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(world["llama"], cwd / name)
    os.symlink(world["gguf"], cwd / "model.gguf")
    for name, path in world["files"].items():
        shutil.copy(path, cwd / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_bash(rel: str, line: int, text: str, cwd: Path, background: list, port: int) -> None:
    from click.testing import CliRunner

    for argv, how in commands(text.replace("8786", str(port))):
        env = {}
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            k, v = argv.pop(0).split("=", 1)
            env[k] = v
        while argv and argv[0] in ("time", "/usr/bin/time", "-v"):
            argv.pop(0)
        argv = [os.path.expanduser(a) for a in argv]
        where = f"{rel}:{line}: {shlex.join(argv)}"
        if argv[0] in NOT_RUN:
            continue
        out_file = None
        if ">" in argv:
            i = argv.index(">")
            argv, out_file = argv[:i], argv[i + 1]
        if argv[0] == "prismoe" and how != "&":
            t0 = time.perf_counter()
            res = CliRunner().invoke(main, argv[1:], env=env, catch_exceptions=True)
            if os.environ.get("PRISMOE_DOCS_TIMES"):
                print(f"{time.perf_counter() - t0:7.1f} s  {where}", file=sys.__stderr__)
            assert res.exit_code == 0, f"{where}\n{res.output}\n{res.exception!r}"
            if out_file:
                Path(out_file).write_text(res.stdout)
            continue
        if argv[0] == "dask" and how == "&":
            proc = subprocess.Popen([str(Path(sys.executable).parent / "dask"), *argv[1:]], cwd=cwd,
                                    env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            background.append(proc)
            _wait_for_port(port, proc, where)
            continue
        if argv[0] == "python" and argv[1].startswith("scripts/"):
            res = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=cwd, env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=600, check=False)
            assert res.returncode == 0, f"{where}\n{res.stdout}\n{res.stderr}"
            continue
        raise AssertionError(f"{where}: the docs test does not know how to run {argv[0]!r}")


def _wait_for_port(port: int, proc, where: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"{where}: exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"{where}: nothing listens on port {port} after {timeout} s")


def _parse_only(rel: str, line: int, text: str) -> None:
    for argv, _ in commands(text):
        while argv and (re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]) or argv[0] in ("time", "/usr/bin/time", "-v")):
            argv.pop(0)
        if ">" in argv:
            argv = argv[:argv.index(">")]
        where = f"{rel}:{line}: {shlex.join(argv)}"
        if argv[0] == "python":
            assert (ROOT / argv[1]).is_file(), where
            continue
        assert argv[0] == "prismoe", where
        cmd, i = main, 1
        while isinstance(cmd, click.Group):
            cmd = cmd.get_command(click.Context(cmd), argv[i])
            assert cmd is not None, f"{where}: no command {argv[i]!r}"
            i += 1
        args = list(argv[i:])
        try:
            cmd.make_context(argv[i - 1], args)
        except click.BadParameter as e:
            assert "does not exist" in str(e), f"{where}: {e}"  # paths of the measured run
        except click.UsageError as e:
            raise AssertionError(f"{where}: {e}") from None


@pytest.mark.slow
@pytest.mark.parametrize("rel", DOCS)
def test_code_blocks_run(rel, world, tmp_path, monkeypatch):
    code = [(t, n, s) for t, n, s in blocks(rel) if t in CODE_TAGS]
    if not code:
        pytest.skip(f"{rel} has no code blocks")
    if rel in RECORDS:
        for tag, line, text in code:
            assert tag == "bash", f"{rel}:{line}: a record of a measured run is a bash block"
            _parse_only(rel, line, text)
        return
    _furnish(world, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(world["home"]))
    background: list = []
    port = _free_port()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models' matrices gain nothing from more; on a busy machine they lose much
    try:
        for tag, line, text in code:
            if tag == "bash":
                _run_bash(rel, line, text, tmp_path, background, port)
            else:
                exec(compile(text, f"{rel}:{line}", "exec"), {"__name__": "__docs__"})  # noqa: S102
    finally:
        torch.set_num_threads(threads)
        for proc in background:
            proc.terminate()
            proc.wait(timeout=30)
