"""Running the fit's tasks: chains of tasks on a Dask scheduler (threads, processes, synchronous or a
``dask.distributed`` cluster), in-process progress ticks, and one BLAS thread per panel product."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prismoe_store.errors import DataError

TICKERS: dict[str, Callable[[int], None]] = {}  # in-process progress callbacks of running fits, by run id
TICKERS_LOCK = threading.Lock()  # guards TICKERS
_BLAS_LOCK = threading.Lock()  # guards the one-BLAS-thread state below
_BLAS_STATE: dict = {"users": 0, "limiter": None, "pool": None}
_LOCAL = threading.local()  # per-thread work arrays of the panel jobs


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: ``taskset``, a container's cpuset), not
    the machine's count.

    >>> usable_cpus() >= 1
    True
    """
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity else (os.cpu_count() or 1))


@contextmanager
def one_blas_thread() -> Iterator[ThreadPoolExecutor]:
    """While any task of a pass with panel products (or the fit's panel solves) runs in this
    process, BLAS uses one thread and the products are spread over the cores by a shared pool
    instead: which thread computes a panel then no longer changes its bits (a GEMM's last bits
    depend on how BLAS splits it over its threads, and dask.distributed's worker processes run
    BLAS single-threaded), and no BLAS thread spins for work beside the threads that write."""
    with _BLAS_LOCK:
        if _BLAS_STATE["users"] == 0:
            from threadpoolctl import threadpool_limits

            _BLAS_STATE["limiter"] = threadpool_limits(1, user_api="blas")
            if _BLAS_STATE["pool"] is None:
                _BLAS_STATE["pool"] = ThreadPoolExecutor(usable_cpus(), thread_name_prefix="prismoe-gemm")
        _BLAS_STATE["users"] += 1
        pool = _BLAS_STATE["pool"]
    try:
        yield pool
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["users"] -= 1
            if _BLAS_STATE["users"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


def reuse(buffers: dict, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A work array kept in ``buffers`` across blocks, grown when too small (fresh large arrays cost
    page faults each time).

    >>> bufs = {}
    >>> reuse(bufs, "a", (2, 3)).shape, reuse(bufs, "a", (1, 2)).base is bufs["a"]
    ((2, 3), True)
    """
    need = int(np.prod(shape))
    buf = buffers.get(name)
    if buf is None or buf.size < need or buf.dtype != dtype:
        buf = buffers[name] = np.empty(need, dtype)
    return buf[:need].reshape(shape)


def thread_buffer(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """:func:`reuse` with the calling thread's own buffers: the panel jobs of the pool reuse theirs
    from block to block."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    return reuse(bufs, name, shape, dtype)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's allocator keep freed memory for reuse in this process (for a process that runs a
    fit: the ``prismoe fit`` command calls it). Returns whether it applied (False off glibc).

    By default glibc returns each freed block of a few MiB or more to the kernel, and the next
    such allocation gets fresh pages that the kernel zeroes first: in a fit — block buffers,
    Zarr's encoded chunks, solve runs — that was a fifth of the process's CPU time on a 2-core VM
    (sys 3.4 s of 17 s at 32 768 rows of 1024 → 8192; 1.0e5 page faults → 5e4 with this). Blocks up
    to ``mmap_threshold`` bytes (glibc allows at most 32 MiB) now come from the heap, which is
    trimmed only when ``trim_threshold`` bytes are free at its top. Peak RSS does not change (the
    memory was in use anyway); it is only not handed back between uses.

    >>> keep_freed_memory() in (True, False)
    True
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


@dataclass
class Runner:
    """Runs per-stripe task chains on the chosen Dask scheduler and reports finished links."""

    kwargs: dict  # keyword arguments for dask.compute
    threads: int  # default number of row stripes for this scheduler
    local: bool  # True for the in-process schedulers (threads, synchronous): tasks share memory
    client: Any = None  # a dask.distributed Client, when one is used
    owns_client: bool = False  # True when we connected it (and must close it)
    tick: Callable[[int], None] = field(default=lambda k: None)  # called with finished links

    def run(self, chains: list[list[tuple]], prefix: str) -> list:
        """Each chain is a list of ``(weight, func, *args)``; the previous link's result is appended to
        the next link's arguments (``None`` for the first). ``weight`` (row blocks) is what a
        finished link adds to the progress. Returns the last result of each chain."""
        import dask
        from dask.callbacks import Callback

        ends, weights = [], {}
        for i, chain in enumerate(chains):
            prev = None
            for j, (weight, func, *args) in enumerate(chain):
                key = f"{prefix}-{i}-{j}"
                weights[key] = weight
                prev = dask.delayed(func, pure=False)(*args, prev, dask_key_name=key)
            ends.append(prev)
        if self.client is not None:
            from distributed import as_completed

            futures = self.client.compute(ends)
            for fut in as_completed(futures):
                self.tick(sum(w for w, *_ in chains[futures.index(fut)]))
            return self.client.gather(futures)

        def posttask(key, result, dsk, state, worker_id):
            self.tick(weights.get(key, 0))

        with Callback(posttask=posttask):
            return list(dask.compute(*ends, **self.kwargs))

    def close(self) -> None:
        if self.owns_client and self.client is not None:
            self.client.close()


def make_runner(scheduler, tasks: int | None) -> Runner:
    """The runner for ``scheduler``; its ``threads`` is the default stripe count. In one process
    the products already use every core (BLAS threads, or the panel pool) and each stripe reads
    its next block in a thread of its own, so more stripes only add reading threads: one per two
    cores, at most 4 (measured on 2 cores: one stripe's pass runs at 0.62 of the matmul rate, two
    stripes' at 0.48)."""
    local = max(1, min(4, usable_cpus() // 2))
    # the local schedulers as functions: given a name, dask imports dask.distributed (~0.4 s) to look for a client
    if scheduler is None or scheduler == "threads":
        from dask.threaded import get

        threads = tasks or local
        return Runner({"scheduler": get, "num_workers": threads}, threads, True)
    if scheduler == "synchronous":  # stripes run one after the other (a reference, and for debugging)
        from dask.local import get_sync

        return Runner({"scheduler": get_sync}, 1, True)
    if scheduler == "processes":
        from dask.multiprocessing import get as get_processes

        threads = tasks or local
        return Runner({"scheduler": get_processes, "num_workers": threads}, threads, False)
    if isinstance(scheduler, str) and "://" in scheduler:
        try:
            from distributed import Client
        except ImportError:
            raise DataError("a scheduler address needs dask.distributed: pip install -e '.[cluster]' in the "
                            "project's checkout, or pip install 'distributed>=2024.8'") from None
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise DataError(f"cannot connect to the Dask scheduler at {scheduler}: {e}") from None
        return Runner({}, max(1, sum(client.nthreads().values())), False, client, True)
    if hasattr(scheduler, "nthreads") and hasattr(scheduler, "compute"):  # a distributed.Client
        return Runner({}, max(1, sum(scheduler.nthreads().values())), False, scheduler)
    raise DataError(f"scheduler must be threads, processes, synchronous or a tcp:// address, got {scheduler!r}")


def resume_note(groups: tuple[int, int], bands: list[tuple[int, int]]) -> str:
    """The line a resumed fit prints: ``groups`` (statistic column groups done, of), ``bands`` per pipe
    (output bands written, of).

    >>> resume_note((4, 4), [(3, 8), (0, 8), (0, 2)])
    'resuming: statistics done, 3 of 8 output bands of pipe 1 written'
    >>> resume_note((1, 4), [(0, 8), (0, 8), (0, 2)])
    'resuming: statistics of 1 of 4 column groups done'
    >>> resume_note((0, 1), [(0, 8), (0, 8), (0, 2)])
    'resuming: nothing was finished yet (the statistics pass starts again)'
    """
    done, of = groups
    if not done and not any(d for d, _ in bands):
        return "resuming: nothing was finished yet (the statistics pass starts again)"
    parts = ["statistics done" if done == of else f"statistics of {done} of {of} column groups done"]
    parts += [f"{d} of {n} output bands of pipe {p + 1} written" for p, (d, n) in enumerate(bands) if d]
    return "resuming: " + ", ".join(parts)
