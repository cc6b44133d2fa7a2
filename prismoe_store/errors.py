"""The library's exception hierarchy.

Every error the library raises on purpose derives from :class:`PrismoeError`, so a caller
(and the CLI) can catch one type and print one line. The subclasses say *what kind* of thing
went wrong, so a test can assert on the kind and not on a message.

>>> from prismoe_store.errors import PrismoeError, GridError
>>> issubclass(GridError, PrismoeError)
True
"""

from __future__ import annotations


class PrismoeError(Exception):
    """Base class of every error the library raises deliberately."""


class GridError(PrismoeError, ValueError):
    """A grid cannot be planned or does not fit the matrix it is asked to cover."""


class SourceError(PrismoeError):
    """A checkpoint or matrix source is missing, truncated, corrupt or unsupported."""


class TensorNotFoundError(SourceError, KeyError):
    """A requested tensor name is not in the source; the message lists what is there."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else "tensor not found"


class UnsafeCheckpointError(SourceError):
    """An intact pickled checkpoint needs a global that weights-only loading does not allow."""


class QuantizedTensorError(SourceError):
    """A tensor is stored scaled or packed in a way this tool cannot turn into exact values."""


class StoreError(PrismoeError):
    """A store cannot be opened, created, read or written."""


class SourceMismatchError(StoreError):
    """A store (or a tensor in it) was made from another source than the one given to resume it."""


class StoreFormatError(StoreError):
    """A store is of another format, another version, or not a prismoe store at all."""


class IncompleteStoreError(StoreError):
    """A store was not finished (an interrupted job): re-run the job to complete it."""


class CorruptStoreError(StoreError):
    """A chunk of a store fails its checksum or cannot be decoded."""


class DataError(PrismoeError, ValueError):
    """Input data is unusable: wrong shapes, NaN/Inf, too few rows, mismatched widths."""


class CastOverflowError(DataError):
    """A value does not fit the dtype it is asked to be stored as (a down-cast would write ±inf)."""


class FitError(PrismoeError):
    """A least-squares solve failed (for example a factorization reported trouble)."""


class CacheError(PrismoeError):
    """The runtime's tile cache cannot honour its byte budget for a request."""


class ModelError(PrismoeError):
    """A model folder or file cannot be loaded (no weights, unknown architecture)."""
