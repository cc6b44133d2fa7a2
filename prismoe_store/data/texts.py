"""The texts pairs are collected on: text files of documents, fingerprinted, and which are done.

A text is a plain-text file (one document per non-blank line) or JSONL (``.jsonl``/``.ndjson``,
one object with a ``"text"`` string per line). :func:`scan_text` hashes it (the hash identifies
the text across runs and paths) and counts its documents; :func:`iter_documents` streams them.
Which documents a store holds is recorded as sorted disjoint ``[start, stop)`` ranges
(:func:`add_range`, :func:`count_done`, :func:`is_done`).

>>> add_range([[0, 2]], 2, 4), is_done([[0, 4]], 3), count_done([[0, 4], [6, 7]])
([[0, 4]], True, 5)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prismoe_store.errors import DataError, SourceError


@dataclass(frozen=True)
class TextSource:
    """A text file of documents, fingerprinted; see :func:`scan_text`."""

    path: str  # absolute path
    sha256: str  # content hash (identifies the text across runs and paths)
    size: int  # bytes
    documents: int  # number of documents
    jsonl: bool  # True: one JSON object with "text" per line; False: one document per non-blank line


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def scan_text(path: str | os.PathLike) -> TextSource:
    """Hash a text file, count its documents and check every line (one streaming pass, memory flat):
    a line that is not UTF-8, or (JSONL) not a JSON object with a string ``"text"``, is a
    :class:`~prismoe_store.errors.DataError` naming the file and line, found before any model runs.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.txt")
    >>> _ = open(p, "w").write("one doc\\n\\nanother doc\\n")
    >>> scan_text(p).documents
    2
    >>> j = os.path.join(os.path.dirname(p), "t.jsonl")
    >>> _ = open(j, "w").write('{"text": "a"}\\n{"text": "b')
    >>> scan_text(j)  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    prismoe_store.errors.DataError: ...t.jsonl:2: not a JSON object (Unterminated string starting at: line 2
    column 10); the line is cut short (truncated file?)
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SourceError(f"no text file at {path}")
    jsonl = _is_jsonl(p)
    digest, count = hashlib.sha256(), 0
    with open(p, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            digest.update(line)
            if line.strip():
                _document(line, lineno, str(p), jsonl)
                count += 1
    if count == 0:
        raise DataError(f"{path} has no documents (the file is empty or blank)")
    return TextSource(str(p.resolve()), digest.hexdigest(), p.stat().st_size, count, jsonl)


def _document(raw: bytes, lineno: int, path: str, jsonl: bool) -> str:
    """The document on line ``lineno`` (a non-blank line of the file ``path``); DataError when unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
    if not jsonl:
        return line.rstrip("\r\n")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        cut = "" if raw.endswith(b"\n") else "; the line is cut short (truncated file?)"
        raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg}: line {lineno} column {e.colno}){cut}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{path}:{lineno}: JSONL line has no string \"text\" field")
    return obj["text"]


def iter_documents(source: TextSource, *, start: int = 0) -> Iterator[tuple[int, str]]:
    """Yield ``(index, text)`` for the documents of ``source`` from index ``start`` on.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.jsonl")
    >>> _ = open(p, "w").write('{"text": "a"}\\n{"text": "b"}\\n')
    >>> list(iter_documents(scan_text(p), start=1))
    [(1, 'b')]
    """
    index = 0
    with open(source.path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            if index >= start:
                yield index, _document(raw, lineno, source.path, source.jsonl)
            index += 1


def add_range(ranges: list, start: int, stop: int) -> list:
    """Merge ``[start, stop)`` into sorted disjoint ``ranges``.

    >>> add_range([[0, 3], [5, 6]], 3, 5)
    [[0, 6]]
    """
    out: list[list[int]] = []
    for a, b in sorted([*map(list, ranges), [start, stop]]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def count_done(ranges: list) -> int:
    """How many indices the sorted disjoint ``[start, stop)`` ``ranges`` cover."""
    return sum(b - a for a, b in ranges)


def is_done(ranges: list, index: int) -> bool:
    """True when ``index`` lies in one of ``ranges``."""
    return any(a <= index < b for a, b in ranges)


def scan_texts(texts) -> list[TextSource]:
    """Scan the text files (a path or several; a text given twice, or under two names, counts once).

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.txt")
    >>> _ = open(p, "w").write("a\\nb\\n")
    >>> [s.documents for s in scan_texts([p, p])]
    [2]
    """
    texts = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    if not texts:
        raise DataError("no text files given")
    return list({s.sha256: s for s in map(scan_text, texts)}.values())
