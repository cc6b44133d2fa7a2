"""The model's own text: sampled continuations of prompts, written as ``.jsonl`` (``prismoe sample``).

A head adapter's band gate learns which bands win from the hidden states it is trained on
(``prismoe fit-gates``). Trained on one kind of text only (say, docstrings), it routes other text
worse, and greedy generation then leaves the dense model's text sooner. The text a generating model
sees is mostly its own, so the model's continuations of varied prompts are the natural training
data for the gate: :func:`sample_texts` writes them as documents (``{"text": prompt +
continuation}``, one a line) for ``prismoe collect --target none``.

On SmolLM2-135M (docs/heads.md, session 24), on held-out sampled text: a gate trained on 8 000 rows
of stdlib docstrings kept the dense head's top token for 0.951 of the tokens at ρ = 0.1; with 13 509
more rows of the model's own text (63 % of the rows), 0.975; with about 5 000 among 72 230 rows
(7 %), 0.957. Put the model's own text first and cap the rest (``collect --max-tokens``).

Sampling is nucleus sampling (``temperature``, ``top_p``) through transformers' ``generate``,
``batch_size`` prompts a call (padded on the left); the seed of each call is derived from
``seed``, the sample's index and the batch's, so the same prompts and settings give the same texts
whatever else ran before. The file is written beside ``output`` and renamed onto it at the end: an
interrupted run leaves no partial file.

>>> SampleSpec(samples=2).samples, SampleSpec().max_new_tokens
(2, 96)
>>> SampleSpec(top_p=1.5)
Traceback (most recent call last):
...
prismoe_store.errors.DataError: top_p must be in (0, 1], got 1.5
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

from prismoe_store.errors import DataError
from prismoe_store.gates.settings import parse_count, parse_positive

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SampleSpec:
    """How :func:`sample_texts` samples (validated on construction)."""

    samples: int = 3  # continuations per prompt
    max_new_tokens: int = 96  # tokens sampled after each prompt (fewer when the model ends the text)
    temperature: float = 0.8  # softmax temperature (> 0)
    top_p: float = 0.95  # nucleus: the smallest set of tokens holding this much probability, in (0, 1]
    seed: int = 0  # the same prompts and settings give the same texts
    batch_size: int = 8  # prompts a generate call
    device: str = "cpu"  # torch device of the model
    dtype: str = "float32"  # compute dtype of the model

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size"):
            parse_count(name, getattr(self, name), minimum=1)
        parse_count("seed", self.seed)
        parse_positive("temperature", self.temperature)
        if not parse_positive("top_p", self.top_p) <= 1:
            raise DataError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_texts(model, prompts: Sequence[str], output, *, spec: SampleSpec = SampleSpec(),
                 progress: Progress | None = None) -> dict:
    """Write ``spec.samples`` sampled continuations of each prompt to ``output`` (``.jsonl``, one
    ``{"text": prompt + continuation, "prompt": i, "sample": j}`` a line, prompt by prompt).

    ``model`` is a transformers causal-LM folder, a ``.gguf`` file or a folder holding one (loaded
    offline), or a :class:`~prismoe_store.data.models.LoadedModel`. ``progress(done, total)`` counts
    texts. Returns ``{"output", "prompts", "texts", "new_tokens", "empty", "replaced", "seconds", "spec"}``
    (``empty``: texts the model ended at once, the prompt alone; ``replaced``: a file was there).

    Raises :class:`DataError` without prompts (or with a blank one) and when ``output``'s folder does
    not exist; the model loader's errors for a model that cannot be loaded.
    """
    import torch

    from prismoe_store.data.models import LoadedModel, load_model
    from prismoe_store.runtime.infer import check_output_folder

    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise DataError("give at least one prompt, none of them blank")
    check_output_folder(output)
    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=spec.device, dtype=spec.dtype)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an end-of-text token: cannot pad a batch")
    side, tok.padding_side = tok.padding_side, "left"  # decoder-only models continue from the right end
    total, done, new_tokens, empty = len(prompts) * spec.samples, 0, 0, 0
    replaced = os.path.exists(output)
    texts: list[list[str]] = [[] for _ in prompts]  # [prompt][sample]
    part = f"{output}.{os.getpid()}.part"
    generate = cast(Callable, lm.model.generate)  # transformers' GenerationMixin
    try:
        if progress:
            progress(0, total)
        for j in range(spec.samples):
            for b, start in enumerate(range(0, len(prompts), spec.batch_size)):
                batch = prompts[start:start + spec.batch_size]
                enc = tok(batch, return_tensors="pt", padding=True).to(lm.device)
                torch.manual_seed(spec.seed * 1_000_003 + j * 10_007 + b)  # this call's own draws
                with torch.no_grad():
                    out = generate(**enc, max_new_tokens=spec.max_new_tokens, do_sample=True,
                                   temperature=spec.temperature, top_p=spec.top_p, pad_token_id=pad)
                cont = out[:, enc["input_ids"].shape[1]:]  # [B, new] the sampled tokens (then padding)
                for i, row in enumerate(cont):
                    real = _until_eos(row, tok.eos_token_id)
                    real = real[real != pad]  # [n] the tokens sampled before the text ended
                    new_tokens += int(real.numel())
                    empty += int(real.numel() == 0)  # the model ended the text at once
                    texts[start + i].append(batch[i] + str(tok.decode(real, skip_special_tokens=True)))
                done += len(batch)
                if progress:
                    progress(done, total)
        with open(part, "w", encoding="utf-8") as f:
            for i, per in enumerate(texts):
                for j, text in enumerate(per):
                    f.write(json.dumps({"text": text, "prompt": i, "sample": j}, ensure_ascii=False) + "\n")
        os.replace(part, output)
    finally:
        tok.padding_side = side
        if os.path.exists(part):
            os.remove(part)
    return {"output": str(output), "prompts": len(prompts), "texts": total, "new_tokens": new_tokens,
            "empty": empty, "replaced": replaced, "seconds": time.perf_counter() - t0, "spec": asdict(spec)}


def _until_eos(row, eos: int | None):
    """The tokens of ``row`` before its first ``eos`` (the padding after an ended text may be ``eos`` too)."""
    if eos is None:
        return row
    ends = (row == eos).nonzero()
    return row if not len(ends) else row[: int(ends[0, 0])]


def sample_line(r: dict, model) -> str:
    """What :func:`sample_texts` wrote, and the next steps, in two or three lines.

    >>> r = {"output": "own.jsonl", "texts": 6, "prompts": 1, "new_tokens": 40, "empty": 2, "replaced": False,
    ...      "seconds": 2.0, "spec": {"samples": 6}}
    >>> print(sample_line(r, "m.gguf"))  # doctest: +NORMALIZE_WHITESPACE
    wrote own.jsonl: 6 texts (1 prompt × 6 samples), 40 new tokens in 2.0 s
    2 of them are the prompt alone (the model ended the text at once: questions often do; openings of
    texts continue)
    next: prismoe collect --upper m.gguf --text own.jsonl --text YOUR_TEXT --max-tokens N --target none -o HIDDEN
    (own.jsonl first: --max-tokens caps the total, so your text fills the rest), then prismoe fit-gates
    HEAD HIDDEN --restart
    """
    s = "s" * (r["prompts"] != 1)
    replaced = " (replaced the file there)" if r.get("replaced") else ""
    lines = [f"wrote {r['output']}: {r['texts']} texts ({r['prompts']} prompt{s} × {r['spec']['samples']} samples), "
             f"{r['new_tokens']} new tokens in {r['seconds']:.1f} s{replaced}"]
    if r.get("empty"):
        lines.append(f"{r['empty']} of them are the prompt alone (the model ended the text at once: questions often "
                     "do; openings of texts continue)")
    lines.append(f"next: prismoe collect --upper {model} --text {r['output']} --text YOUR_TEXT --max-tokens N "
                 f"--target none -o HIDDEN   ({r['output']} first: --max-tokens caps the total, so your text fills "
                 "the rest), then prismoe fit-gates HEAD HIDDEN --restart")
    return "\n".join(lines)
