"""Tiny real models, built offline, for tests and benchmarks (no network, no downloads).

Everything here writes real files in the formats users bring: a Hugging Face model folder
(``config.json`` + ``model.safetensors`` + a ``tokenizer.json`` trained with the ``tokenizers``
library and wrapped as ``PreTrainedTokenizerFast``), and a GGUF file of a Llama written with the
``gguf`` package's ``GGUFWriter`` in the layout transformers' GGUF loader reads (llama.cpp tensor
names, llama.cpp's permuted q/k rows, a byte-level BPE vocabulary in ``tokenizer.ggml.*``).

Functions are general so other tests can reuse them:

- :func:`corpus_lines` — deterministic English-like lines (text to train tokenizers and collect on).
- :func:`train_tokenizer` — a byte-level BPE or a word-level tokenizer trained on lines.
- :func:`save_llama` / :func:`save_qwen2` — a seeded random model of that architecture saved as a
  folder with its tokenizer.
- :func:`write_llama_gguf` — a Llama folder's weights and tokenizer written as one GGUF file.
- :func:`write_texts` — a plain-text or JSONL file of documents.

Sizes default to a few thousand parameters so a forward pass takes milliseconds. Typical use
(``tmp_path`` from pytest)::

    llama = save_llama(tmp_path / "llama")                 # folder: config, safetensors, tokenizer
    gguf = write_llama_gguf(llama, tmp_path / "llama.gguf")  # the same weights as one GGUF file
    qwen = save_qwen2(tmp_path / "qwen")                   # another architecture and tokenizer
    text = write_texts(tmp_path / "t.txt", corpus_lines(20))
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = [UNK, BOS, EOS, PAD]  # ids 0..3 in every tokenizer built here

_WORDS = (
    "the a an of to in on for with by from at as is was are were be been this that these those it its "
    "model matrix tile worker pipe gate adapter token layer hidden state output input weight store chunk "
    "row column band slice grid memory cache device disk read write stream batch fit solve least squares "
    "small large fast slow quiet loud red green blue river mountain city forest ocean cloud rain snow sun "
    "moon star tree house road bridge window door table chair book paper pencil letter word sentence line "
    "runs walks sees makes takes gives finds keeps holds turns moves brings writes reads learns builds"
).split()


def corpus_lines(n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 14) -> list[str]:
    """``n`` deterministic English-like lines (lowercase words, a full stop, sometimes a comma).

    >>> corpus_lines(2, seed=1) == corpus_lines(2, seed=1)
    True
    """
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        if len(words) > 4 and rng.random() < 0.3:
            words[rng.randrange(1, len(words) - 1)] += ","
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def train_tokenizer(lines: list[str], *, kind: str = "bpe", vocab_size: int = 300, add_bos: bool = True):
    """A ``PreTrainedTokenizerFast`` trained on ``lines``.

    ``kind="bpe"``: byte-level BPE (every string encodes; GPT-2/Llama-3 style; the only kind
    :func:`write_llama_gguf` can store). ``kind="wordlevel"``: whitespace/punctuation words, unknown
    words map to ``<unk>``. Special tokens are ``<unk> <s> </s> <pad>`` (ids 0..3); with ``add_bos``
    every encoding starts with ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    else:
        raise ValueError(f"kind must be bpe or wordlevel, got {kind!r}")
    tok.train_from_iterator(lines, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def _seeded_init(model, seed: int, std: float) -> None:
    """Give every parameter seeded normal values (norm weights around 1) so outputs are non-trivial."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def _save(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_llama(folder, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 64, tokenizer=None, lines: list[str] | None = None, vocab_size: int = 300,
               tie_embeddings: bool = False, max_positions: int = 512, model_vocab: int | None = None,
               seed: int = 0, std: float = 0.1) -> Path:
    """Save a seeded random ``LlamaForCausalLM`` with a byte-level BPE tokenizer to ``folder``.

    The tokenizer is ``tokenizer`` if given, else one trained on ``lines`` (default: 200 lines of
    :func:`corpus_lines`) with up to ``vocab_size`` entries. The model's vocabulary (embedding rows,
    ``lm_head`` rows) is the tokenizer's size, or ``model_vocab`` when larger: padded with rows no
    token uses, as many real checkpoints are (a way to get a realistic ``lm_head`` width from a
    small tokenizer).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or train_tokenizer(lines or corpus_lines(200), kind="bpe", vocab_size=vocab_size)
    config = LlamaConfig(vocab_size=max(len(tokenizer), model_vocab or 0), hidden_size=hidden,
                         intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    _seeded_init(model, seed, std)
    return _save(model, tokenizer, Path(folder))


def save_qwen2(folder, *, hidden: int = 48, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 96, tokenizer=None, lines: list[str] | None = None, vocab_size: int = 200,
               max_positions: int = 512, seed: int = 1, std: float = 0.1) -> Path:
    """Save a seeded random ``Qwen2ForCausalLM`` with a *word-level* tokenizer (so its token ids and
    counts differ from :func:`save_llama`'s) to ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or train_tokenizer(lines or corpus_lines(200), kind="wordlevel", vocab_size=vocab_size)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    _seeded_init(model, seed, std)
    return _save(model, tokenizer, Path(folder))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (rotary halves interleaved), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(folder, path, *, tensor_type: str = "f32") -> Path:
    """Write the Llama model in ``folder`` (from :func:`save_llama`) as a GGUF file at ``path``.

    Tensors get llama.cpp names (``token_embd``, ``blk.N.attn_q``, ``output``...) via gguf's own name
    map, q/k rows are permuted as llama.cpp's converter does, and the byte-level BPE vocabulary and
    merges go to ``tokenizer.ggml.*`` (model ``gpt2``). ``tensor_type`` is ``f32`` (exact) or ``f16``
    (2-D weights rounded to half precision; norms stay f32, as llama.cpp writes them).
    """
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, path = Path(folder), Path(path)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if tensor_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError("write_llama_gguf stores byte-level BPE tokenizers only")
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = set(SPECIALS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = CONTROL, 1 = NORMAL
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        data = tensor.detach().numpy().astype(np.float32)
        if gguf_name.endswith("attn_q"):
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        if tensor_type == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        writer.add_tensor(f"{gguf_name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_texts(path, documents: list[str], *, jsonl: bool | None = None) -> Path:
    """Write ``documents`` one per line (plain text), or as ``{"text": ...}`` lines when ``jsonl``
    (default: when the path ends in ``.jsonl``)."""
    path = Path(path)
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    with open(path, "w", encoding="utf-8") as fh:
        for doc in documents:
            fh.write((json.dumps({"text": doc}) if jsonl else doc) + "\n")
    return path
