"""A ``torch.nn.Module`` head over the runtime, to stand in for a model's ``lm_head``.

:class:`PrisMoEHead` maps hidden states ``[..., hidden]`` to logits ``[..., vocab]`` through a
:class:`~prismoe_store.runtime.Runtime` (tiles loaded lazily through its cache) and hands the
result back in the caller's dtype and device. It holds no parameters: the tiles stay in the
adapter store until a gate selects them. :func:`replace_lm_head` swaps it into a transformers
causal LM (``model.set_output_embeddings``), checking the widths first; :func:`generate` does
that for a local model folder and generates greedily, optionally beside the original head.

>>> import numpy as np, torch
>>> from prismoe_store.adapter import AdapterStore
>>> from prismoe_store.grid import plan_grid
>>> a = AdapterStore.create("memory://doc-head", grids=[plan_grid(4, 6, 4)], overwrite=True,
...                         attrs={"complete": True})
>>> head = PrisMoEHead.from_adapter(a)
>>> head(torch.ones(1, 2, 4, dtype=torch.bfloat16)).dtype
torch.bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DataError, ModelError
from .runtime import Runtime, open_runtime


class PrisMoEHead(torch.nn.Module):
    """``lm_head`` replacement: ``hidden [..., d_in] → logits [..., d_out]`` through a runtime."""

    def __init__(self, runtime: Runtime):
        super().__init__()
        self.runtime = runtime  # the adapter runtime (its own device and tile cache)
        self.in_features = runtime.d_in  # hidden width, like nn.Linear
        self.out_features = runtime.d_out  # vocabulary size, like nn.Linear

    @classmethod
    def from_adapter(cls, adapter, **runtime_options) -> "PrisMoEHead":
        """Open a runtime on ``adapter`` (path, URL or TileSource) with :func:`open_runtime` options."""
        return cls(open_runtime(adapter, **runtime_options))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.runtime(hidden)  # [..., d_out] float32 on the runtime's device
        return logits.to(device=hidden.device, dtype=hidden.dtype)

    def stats(self) -> dict:
        """The runtime's cache and timing statistics."""
        return self.runtime.stats()

    def extra_repr(self) -> str:
        c = self.runtime.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, device={c.device}, "
                f"quant={c.quant or 'fp32'}, mode={c.mode}, sparsity={self.runtime.sparsity}")


def replace_lm_head(model, head: PrisMoEHead) -> torch.nn.Module:
    """Put ``head`` in place of ``model``'s output embeddings; returns the old head.

    The widths must match (hidden → vocab). Weight tying is switched off in the config so that a
    later ``tie_weights`` does not try to tie the new head to the input embeddings.
    """
    old = model.get_output_embeddings()
    if old is None:
        raise DataError(f"{type(model).__name__} has no output embeddings (lm_head) to replace")
    hidden = getattr(old, "in_features", None)
    vocab = getattr(old, "out_features", None)
    if (hidden, vocab) != (head.in_features, head.out_features):
        raise DataError(f"the adapter maps {head.in_features} → {head.out_features}, "
                        f"but the model's lm_head maps {hidden} → {vocab}")
    if getattr(old, "bias", None) is not None and getattr(head, "bias", None) is None:
        raise ModelError(f"the model's lm_head adds a bias ({vocab} values, e.g. Phi-2, GPT-J) that this adapter "
                         "head does not carry: its logits would be off by it, so the head is not replaced")
    for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    return old


@dataclass(frozen=True)
class Generation:
    """Greedy text from a model whose ``lm_head`` was replaced by an adapter."""

    text: str  # prompt + continuation with the PrisMoE head
    original: str | None  # prompt + continuation with the model's own head (when compared)
    new_tokens: int  # tokens generated with the PrisMoE head
    agreement: float | None  # share of generated positions where both heads chose the same token
    stats: dict  # the runtime's cache and timing statistics

    @property
    def same(self) -> bool | None:
        """True when both heads produced the same text (``None`` without a comparison)."""
        return None if self.original is None else self.text == self.original


def load_causal_lm(model_dir: str):
    """``(model, tokenizer)`` of a local transformers causal-LM folder, offline, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelError("loading models needs transformers: pip install 'prismoe-store[models]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load a causal LM from {model_dir}: {e}") from None
    return model.eval(), tokenizer


def generate(adapter, model_dir: str, prompt: str, *, max_new_tokens: int = 20, compare: bool = False,
             **runtime_options) -> Generation:
    """Greedy generation from ``model_dir`` with its ``lm_head`` replaced by ``adapter``.

    ``runtime_options`` go to :func:`~prismoe_store.runtime.open_runtime`; the model runs on the
    runtime's device. With ``compare`` the original head generates first, from the same prompt.
    """
    model, tokenizer = load_causal_lm(model_dir)
    device = torch.device(runtime_options.get("device", "cpu"))
    model.to(device)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = inputs["input_ids"].shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def greedy() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad)[0, n_prompt:]  # [new]

    original_ids = greedy() if compare else None
    head = PrisMoEHead.from_adapter(adapter, **runtime_options)
    replace_lm_head(model, head)
    ids = greedy()
    decode = lambda t: tokenizer.decode(torch.cat([inputs["input_ids"][0], t]), skip_special_tokens=True)  # noqa: E731
    agreement = None
    if original_ids is not None:
        n = max(len(ids), len(original_ids))
        same = sum(int(a == b) for a, b in zip(ids.tolist(), original_ids.tolist()))
        agreement = same / n if n else 1.0
    stats = head.stats()
    head.runtime.close()
    return Generation(text=decode(ids), original=None if original_ids is None else decode(original_ids),
                      new_tokens=len(ids), agreement=agreement, stats=stats)
