"""Progress bars for the CLI, behind one helper so ``--quiet`` silences them all.

Library functions take ``progress=`` a callable ``(done, total) -> None``; :func:`bar` makes one
that drives a tqdm bar on stderr, or does nothing when quiet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager

import click
from tqdm import tqdm

ProgressFn = Callable[[int, int], None]


@contextmanager
def bar(desc: str, *, quiet: bool = False, unit: str = "it", growing: bool = False) -> Iterator[ProgressFn | None]:
    """Yield a ``(done, total)`` callback that updates a progress bar (``None`` when quiet).

    A new ``total`` starts a new bar (a new phase), unless ``growing``: then the total is an
    estimate (``None``: unknown) that the same bar takes over.
    """
    if quiet:
        yield None
        return
    state: dict = {"bar": None}

    def update(done: int, total: int | None) -> None:
        b = state["bar"]
        if growing and b is not None and b.total != total:
            b.total = total
            b.refresh()
        if b is None or b.total != total:
            if b is not None:
                b.close()
            # starts where the job is (a resumed job has work done), so its first line is not 0/total
            b = state["bar"] = tqdm(total=total, initial=done, desc=desc, unit=unit, leave=True, dynamic_ncols=True)
        b.update(done - b.n)  # tqdm redraws at most every mininterval, so piped output stays short

    try:
        yield update
    finally:
        if state["bar"] is not None:
            state["bar"].close()


def stage_bars(quiet: bool, units: dict[str, str] | None = None, *, default_unit: str = "step",
               growing: tuple[str, ...] = ()) -> Callable[[str], ContextManager[ProgressFn | None]]:
    """A ``progress(stage)`` factory for jobs of several stages: one :func:`bar` per stage, named after
    it, counting ``units[stage]`` (else ``default_unit``); stages in ``growing`` have estimated totals."""
    units = units or {}
    return lambda stage: bar(stage, quiet=quiet, unit=units.get(stage, default_unit), growing=stage in growing)


def quiet_option(f):
    """The shared ``--quiet/-q`` switch."""
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)
