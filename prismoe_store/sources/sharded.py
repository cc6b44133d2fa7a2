"""A Hugging Face sharded checkpoint (an ``*.index.json`` whose ``weight_map`` names the shards).

Only what is read is checked: an index entry whose shard lacks the tensor (a stale entry) or
whose shard file is missing makes *that* tensor unavailable — asking for it is refused with the
reason — while every other tensor reads normally.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prismoe_store.errors import SourceError, TensorNotFoundError
from prismoe_store.sources.base import Source, reading
from prismoe_store.sources.records import CheckpointFacts, Resolution, TensorInfo
from prismoe_store.sources.resolve import ALIASES, HEAD_BIASES


class ShardedSource(Source):
    """The shards an index names, read as one checkpoint; ``open_shard`` opens one shard file."""

    format = "sharded"

    def __init__(self, index_path, open_shard: Callable[[Path], Source], facts: CheckpointFacts | None = None):
        super().__init__(index_path, facts)
        with reading(self.path, "a checkpoint index"):
            weight_map = json.loads(Path(self.path).read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise SourceError(f"{self.path}: weight_map is not an object")
        folder = Path(self.path).parent
        for name, file in weight_map.items():
            _check_entry(self.path, folder, name, file)
        self._shards: dict[str, Source] = {}
        self.unavailable: dict[str, str] = {}  # index entries that cannot be read -> why
        missing_files = {}
        for file in sorted(set(weight_map.values())):
            if (folder / file).is_file():
                self._shards[file] = open_shard(folder / file)
            else:
                missing_files[file] = f"{self.path} puts it in {file}, which is not there"
        self.format = "sharded " + "/".join(sorted({s.format for s in self._shards.values()}) or ["?"])
        self._where: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        for name, file in weight_map.items():
            if file in missing_files:
                self.unavailable[name] = missing_files[file]
            elif name not in self._shards[file].tensors():
                self.unavailable[name] = (f"{self.path} puts it in {file}, which has no such tensor "
                                          "(a stale index entry)")
            else:
                self._where[name] = file
                self._infos[name] = self._shards[file].tensors()[name]

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def files(self) -> list[str]:
        return [self.path, *(s.path for s in self._shards.values())]

    def resolution(self, name: str) -> Resolution:
        """As :meth:`Source.resolution`, refusing when what was asked for, or what belongs with the
        chosen tensor (its scales, its bias), is an index entry that cannot be read."""
        if name in self.unavailable:
            raise TensorNotFoundError(f"cannot read {name!r}: {self.unavailable[name]}")
        skipped = [n for n in ALIASES.get(name, ()) if n in self.unavailable]
        try:
            found = super().resolution(name)
        except TensorNotFoundError as e:
            if skipped:
                raise TensorNotFoundError(f"cannot read {skipped[0]!r}: {self.unavailable[skipped[0]]}") from None
            raise TensorNotFoundError(f"{e}{self._unreadable_note()}") from None
        if skipped and found.rule not in ("exact", "alias"):
            raise TensorNotFoundError(f"cannot read {skipped[0]!r}: {self.unavailable[skipped[0]]}")
        stem = found.tensor.removesuffix(".weight")
        related = [n for n in self.unavailable if n.startswith((stem + ".", found.tensor)) and n != found.tensor]
        related += [n for n in HEAD_BIASES if n in self.unavailable and name == "lm_head"]
        if related:
            raise TensorNotFoundError(f"{found.tensor!r} goes with {related[0]!r}, which cannot be read: "
                                      f"{self.unavailable[related[0]]}")
        return found

    def _unreadable_note(self) -> str:
        if not self.unavailable:
            return ""
        return f" (unreadable index entries: {', '.join(sorted(self.unavailable)[:6])})"

    def read_stored(self, name, rows, cols):
        return self._shards[self._where[name]].read_stored(name, rows, cols)

    def read_stored_all(self, name):
        return self._shards[self._where[name]].read_stored_all(name)


def _check_entry(index: str, folder: Path, name: str, file) -> None:
    """Refuse an index entry that is not a file name, or names a file outside the checkpoint's folder
    (an absolute path, ``..``, or a link leading out): a checkpoint reads only its own files."""
    if not isinstance(file, str) or not file:
        raise SourceError(f"{index}: weight_map[{name!r}] must be a shard file name, got {file!r}")
    inside = folder.resolve()
    target = (folder / file).resolve()
    if Path(file).is_absolute() or not target.is_relative_to(inside):
        raise SourceError(f"{index}: weight_map puts {name!r} in {file!r}, outside the checkpoint folder {folder}: "
                          "refusing to read it")
