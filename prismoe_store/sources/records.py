"""Records describing an opened checkpoint: its tensors, what it says about itself, how a name was
resolved, how a scaled tensor is turned into values, and the stamp a store keeps of its source.

All are frozen dataclasses; the ``parse_*`` functions validate values read from files or stores.

>>> r = Resolution("lm_head", "token_embd.weight", "tied", "GGUF has no output.weight")
>>> r.line()
'lm_head -> token_embd.weight (tied: GGUF has no output.weight)'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prismoe_store.errors import SourceError, StoreError

RULES = ("exact", "alias", "suffix", "only tensor", "tied")  # how a name can be resolved


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source, as the source describes it.

    >>> TensorInfo("lm_head.weight", (32000, 4096), "BF16").is_matrix
    True
    """

    name: str  # the tensor's name in the source
    shape: tuple[int, ...]  # numpy order, rows first (GGUF's reversed dims already flipped)
    dtype: str  # the source's own spelling: "F32", "BF16", "F8_E4M3", "Q4_0", "float16", ...

    def __post_init__(self) -> None:
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise SourceError(f"tensor {self.name!r} has a bad shape {self.shape}")

    @property
    def is_matrix(self) -> bool:
        """True for a 2-D tensor."""
        return len(self.shape) == 2


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint says (or shows) about itself beyond its list of tensors.

    ``tied`` is ``True``/``False`` only when the checkpoint states it (config.json's
    ``tie_word_embeddings``) or shows it (a GGUF set without ``output.weight``); ``None`` means
    nothing says, and then an ``lm_head`` is never replaced by the embedding.

    >>> CheckpointFacts(tied=True, tied_why="config.json: tie_word_embeddings=true").tied
    True
    """

    tied: bool | None = None  # the head is the input embedding (True), is not (False), unknown (None)
    tied_why: str = ""  # where ``tied`` comes from, for messages
    block_size: tuple[int, int] | None = None  # config.json quantization_config.weight_block_size
    quant_method: str | None = None  # config.json quantization_config.quant_method ("fp8", "gptq", ...)
    architectures: tuple[str, ...] = ()  # config.json architectures (model classes)


NO_FACTS = CheckpointFacts()  # a checkpoint that says nothing about itself


@dataclass(frozen=True)
class Resolution:
    """Which tensor a requested name stands for, and why."""

    asked: str  # the name or alias asked for ("lm_head", "embedding", a tensor name)
    tensor: str  # the tensor chosen in the source
    rule: str  # one of :data:`RULES`
    why: str  # one line: what in the checkpoint made this the answer

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise SourceError(f"unknown resolution rule {self.rule!r}")

    def line(self) -> str:
        """``asked -> tensor (rule: why)``, the line the CLI prints."""
        return f"{self.asked} -> {self.tensor} ({self.rule}: {self.why})"

    def as_dict(self) -> dict:
        """JSON-able form, as recorded in a weights store."""
        return {"asked": self.asked, "tensor": self.tensor, "rule": self.rule, "why": self.why}


@dataclass(frozen=True)
class BlockScale:
    """How a scaled tensor becomes values: ``W[i, j] = stored[i, j] · scale[i // rows, j // cols]``."""

    tensor: str  # the scale tensor's name (e.g. ``lm_head.weight_scale_inv``)
    block: tuple[int, int]  # (rows, cols) of the stored tensor one scale value covers
    why: str  # how the block size was found

    def __post_init__(self) -> None:
        parse_block_size(self.block)


def parse_block_size(value: Any) -> tuple[int, int]:
    """A ``[rows, cols]`` block size of positive integers (as in ``weight_block_size``).

    >>> parse_block_size([128, 128])
    (128, 128)
    """
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise SourceError(f"a block size must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


FINGERPRINT_METHOD = "sha256/v1: name, shape, dtype; float values of 16 windows of up to 16 rows, evenly spaced; bias"


@dataclass(frozen=True)
class SourceStamp:
    """What a stored tensor was made from: the checkpoint's path and size, and a content fingerprint.

    The fingerprint (see :data:`FINGERPRINT_METHOD`) hashes the values of evenly spaced row windows
    as read (after dequantization and scales), so another checkpoint with the same names, shapes
    and dtypes (a fine-tune) differs, while the same file moved or copied does not.

    >>> s = SourceStamp("/m/model.safetensors", 1024, "sha256:ab", FINGERPRINT_METHOD)
    >>> parse_stamp(s.as_attrs()) == s
    True
    """

    path: str  # the file or folder the checkpoint was opened from
    size: int  # bytes of every file read as this checkpoint
    fingerprint: str  # "sha256:<hex>"
    method: str  # how the fingerprint was computed

    def as_attrs(self) -> dict:
        """The weights-store attributes that record it."""
        return {"source": self.path, "source_size": self.size, "source_fingerprint": self.fingerprint,
                "source_fingerprint_method": self.method}


def parse_stamp(attrs: Mapping[str, Any]) -> SourceStamp | None:
    """The stamp recorded in a stored tensor's attributes (``None`` for stores written before stamps)."""
    if "source_fingerprint" not in attrs:
        return None
    try:
        return SourceStamp(str(attrs["source"]), int(attrs["source_size"]), str(attrs["source_fingerprint"]),
                           str(attrs["source_fingerprint_method"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"a stored source record is damaged: {e}") from None
