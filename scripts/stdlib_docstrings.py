"""Real text for the sparse-head measurements: the standard library's docstrings as two JSONL files,
a train half and a held-out half (split by module, a CRC of its name), and generation prompts (the
first eight words of every 46th held-out docstring, at most ten).

    python scripts/stdlib_docstrings.py train.jsonl held.jsonl held_prompts.txt

Docstrings are ``inspect.getdoc`` of every public module, class and function of the modules in
``sys.stdlib_module_names`` that import, longer than 200 characters, each text once. The split and
the prompts depend on the Python version's standard library (3.11 here).
"""

import importlib
import inspect
import json
import sys
import warnings
import zlib

SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo")  # side effects or GUI


def docstrings(module) -> list[str]:
    """The module's docstring and those of its public functions and classes."""
    docs = [inspect.getdoc(module)]
    for name, obj in vars(module).items():
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            docs.append(inspect.getdoc(obj))
    return [d for d in docs if d and len(d) > 200]


def main(train_path: str, held_path: str, prompts_path: str) -> None:
    warnings.filterwarnings("ignore")
    seen: set[str] = set()
    held_docs: list[str] = []
    counts = [0, 0]
    with open(train_path, "w") as train, open(held_path, "w") as held:
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            is_held = zlib.crc32(name.encode()) % 2 == 1
            for d in docstrings(module):
                if d in seen:
                    continue
                seen.add(d)
                (held if is_held else train).write(json.dumps({"text": d}) + "\n")
                counts[is_held] += 1
                if is_held:
                    held_docs.append(d)
    with open(prompts_path, "w") as f:
        for d in held_docs[::46][:10]:
            f.write(" ".join(d.split()[:8]) + "\n")
    print(f"{counts[0]} train and {counts[1]} held-out docstrings; prompts in {prompts_path}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", help="JSONL written with the train half's docstrings")
    parser.add_argument("held", help="JSONL written with the held-out half's docstrings")
    parser.add_argument("prompts", help="text file written with the generation prompts, one a line")
    args = parser.parse_args()
    main(args.train, args.held, args.prompts)
