"""bench/timing.py: the heap setting the benchmarks time under, and the interleaved speed figures."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from prismoe_store.bench.timing import speed_against_dense, steady_heap

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK = 8 << 20  # above glibc's default mmap threshold, below the one steady_heap sets


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def rss_freed_by_a_block() -> int:
    """Resident bytes that allocating, touching and freeing a BLOCK-byte array gives back."""
    a = np.ones(BLOCK, np.uint8)
    before = resident_bytes()
    del a
    return before - resident_bytes()


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc malloc's (mallopt); elsewhere steady_heap changes nothing")
def test_steady_heap_keeps_freed_memory_and_restores_the_default():
    rss_freed_by_a_block()  # let numpy and the allocator settle
    with steady_heap() as how:
        assert how.startswith("freed memory kept for reuse by glibc")
        kept = rss_freed_by_a_block()
        kept_again = rss_freed_by_a_block()
    given_back = rss_freed_by_a_block()
    assert kept < BLOCK // 4 and kept_again < BLOCK // 4  # freed, but still mapped for the next allocation
    assert given_back > BLOCK // 2  # glibc's defaults again: a block this size is unmapped when freed


def test_speed_against_dense_gives_ratios_of_its_own_medians():
    x1, xb = torch.ones(1, 64), torch.ones(32, 64)
    w = torch.ones(128, 64)
    s = speed_against_dense(lambda x: torch.nn.functional.linear(x, w), lambda x: torch.nn.functional.linear(x, w),
                            x1, xb, repeats=3)
    assert s["latency_vs_dense"] == pytest.approx(s["latency_s"] / s["dense_latency_s"])
    assert s["throughput_vs_dense"] == pytest.approx(s["throughput_tok_s"] / s["dense_throughput_tok_s"])
    assert s["throughput_tok_s"] > 0 and s["dense_throughput_tok_s"] > 0
