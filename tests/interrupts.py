"""Interrupting a job at a chosen progress tick, as Ctrl-C or a kill would, for the resume tests."""

from __future__ import annotations


class Interrupted(Exception):
    """Raised from a job's progress callback: the job stops there, with what it wrote kept."""


def at_first_work(done: int, total: int) -> None:
    """A ``progress(done, total)`` callback that interrupts the job once any work is done."""
    if done:
        raise Interrupted
