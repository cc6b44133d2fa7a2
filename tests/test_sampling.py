"""`prismoe sample`: a real (tiny, offline) transformers Llama's sampled continuations as .jsonl
documents that `prismoe collect` reads; reproducible, atomic, with clear errors."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from interrupts import Interrupted, at_first_work
from tiny_models import save_llama  # noqa: E402

from prismoe_store.data.sampling import SampleSpec, sample_texts  # noqa: E402
from prismoe_store.errors import DataError  # noqa: E402

PROMPTS = ["the model of the", "a tile worker is", "hidden state output"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("llama") / "model")


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_sampled_texts_continue_their_prompts_and_repeat_with_the_seed(llama, tmp_path):
    from prismoe_store.data.models import load_model

    lm = load_model(llama)
    side = lm.tokenizer.padding_side
    spec = SampleSpec(samples=2, max_new_tokens=6, batch_size=2, seed=3)
    calls = []
    r = sample_texts(lm, PROMPTS, tmp_path / "a.jsonl", spec=spec, progress=lambda d, t: calls.append((d, t)))
    rows = _lines(tmp_path / "a.jsonl")
    assert r["texts"] == len(rows) == 6 and r["prompts"] == 3
    assert [(row["prompt"], row["sample"]) for row in rows] == [(i, j) for i in range(3) for j in range(2)]
    for row in rows:
        assert row["text"].startswith(PROMPTS[row["prompt"]]) and len(row["text"]) > len(PROMPTS[row["prompt"]])
    assert 0 < r["new_tokens"] <= 6 * 6  # the sampled tokens, not the padding
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    assert lm.tokenizer.padding_side == side  # left padding only while sampling
    # the same settings give the same texts; another seed other texts
    sample_texts(lm, PROMPTS, tmp_path / "b.jsonl", spec=spec)
    assert _lines(tmp_path / "b.jsonl") == rows
    sample_texts(lm, PROMPTS, tmp_path / "c.jsonl", spec=SampleSpec(samples=2, max_new_tokens=6, batch_size=2, seed=4))
    assert _lines(tmp_path / "c.jsonl") != rows


def test_an_interrupted_run_leaves_no_file(llama, tmp_path):
    with pytest.raises(Interrupted):
        sample_texts(llama, PROMPTS, tmp_path / "t.jsonl", spec=SampleSpec(samples=2, max_new_tokens=3),
                     progress=at_first_work)
    assert list(tmp_path.iterdir()) == []


def test_sample_command_writes_what_collect_reads(llama, tmp_path):
    from cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "texts.jsonl"
    res = CliRunner().invoke(main, ["sample", "--model", str(llama), "--prompts-file", str(prompts), "--prompt",
                                    "weight store chunk", "--samples", "2", "--max-new-tokens", "5", "-o", str(out),
                                    "-q"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}: 8 texts (4 prompts × 2 samples)" in res.output and "replaced" not in res.output
    assert f"next: prismoe collect --upper {llama} --text {out} --text YOUR_TEXT --max-tokens N" in res.output
    again = CliRunner().invoke(main, ["sample", "--model", str(llama), "--prompts-file", str(prompts), "--prompt",
                                      "weight store chunk", "--samples", "2", "--max-new-tokens", "5", "-o", str(out),
                                      "-q", "--json"])
    info = json.loads(again.stdout)
    assert info["replaced"] is True and 0 <= info["empty"] <= 8  # the same file again, and it says so
    hidden = tmp_path / "hidden.zarr"
    res = CliRunner().invoke(main, ["collect", "--upper", str(llama), "--text", str(out), "--target", "none", "-o",
                                    str(hidden), "-q"])
    assert res.exit_code == 0, res.output
    from prismoe_store.stores.pairs import PairsStore

    assert PairsStore.open(str(hidden)).rows > 8  # every text's tokens, the prompts' included


def test_sample_refusals_are_one_line_and_leave_nothing(llama, tmp_path):
    from cli.main import main

    out = tmp_path / "t.jsonl"
    for args, says in ((["--prompt", "x", "--samples", "0"], "--samples"),
                       (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
                       ([], "give --prompt"),
                       (["--prompt", "x", "-o", str(tmp_path / "missing" / "t.jsonl")], "does not exist")):
        full = ["sample", "--model", str(llama), *args]
        if "-o" not in args:
            full += ["-o", str(out)]
        res = CliRunner().invoke(main, full)
        assert res.exit_code != 0 and says in res.output and "Traceback" not in res.output, res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="blank"):
        sample_texts(llama, ["ok", "  "], tmp_path / "t.jsonl")
    with pytest.raises(DataError, match="temperature"):
        SampleSpec(temperature=0.0)
