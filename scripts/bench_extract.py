#!/usr/bin/env python
"""Benchmark extraction: peak RSS against the matrix size, throughput against a plain read.

For each size it writes a float32 ``.safetensors`` matrix (``rows × --cols``, random normal,
streamed to disk so this process never holds it) — or, with ``--format gguf``, a GGUF file with
that matrix as a Q8_0 ``output.weight`` and, as in a real model, a vocabulary of ``rows`` tokens
in its metadata (``tokenizer.ggml.tokens``/``scores``/``token_type``) — then for each compressor
extracts it in a fresh subprocess and reports

- the child's peak RSS (``VmHWM``) as a share of the matrix bytes, and the growth over the
  child's RSS once its imports are done (interpreter + numpy + zarr);
- extraction throughput as a ratio to a plain sequential read of the same file's bytes
  (``readinto`` a 16 MiB buffer), measured in the same run (both from a warm page cache), and to
  a plain copy of the file (read + write to a new file: the cost of moving the bytes to disk).

    python scripts/bench_extract.py                     # 1 GiB and 0.5 GiB, compressors none and zstd
    python scripts/bench_extract.py --sizes-mb 64 --json
    python scripts/bench_extract.py --format gguf --cols 640 --sizes-mb 160 640 --compressors zstd
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# The child reads its own VmRSS / VmHWM (peak RSS of *its* address space). getrusage's ru_maxrss
# is not used: Linux carries the parent's high-water mark into a child across fork/vfork + exec,
# so a child started from a big parent would report the parent's peak.
CHILD = """
import json, sys, time
from prismoe_store.data.extract import extract
from prismoe_store.stores.formats import StoreOptions

def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

source, store, compressor, workers, tensor = sys.argv[1:6]
base = status_kb("VmRSS")
t0 = time.perf_counter()
extract(source, store, tensors=[tensor], workers=int(workers), options=StoreOptions(compressor=compressor))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "base_kb": base, "peak_kb": status_kb("VmHWM")}))
"""


def write_matrix(path: Path, rows: int, cols: int, *, chunk_rows: int = 4096, seed: int = 0) -> int:
    """Stream a random float32 ``rows × cols`` tensor ``W`` into a safetensors file; returns its data bytes."""
    nbytes = rows * cols * 4
    header = json.dumps({"W": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for r in range(0, rows, chunk_rows):
            f.write(rng.standard_normal((min(chunk_rows, rows - r), cols), dtype=np.float32).tobytes())
    return nbytes


def write_gguf_matrix(path: Path, rows: int, cols: int, *, chunk_rows: int = 8192, seed: int = 0) -> int:
    """A Q8_0 ``output.weight`` of ``rows × cols`` random normal values plus a ``rows``-token vocabulary;
    returns the float32 bytes of the matrix (what extraction writes)."""
    import gguf
    from gguf.quants import quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)
    raw = np.concatenate([quantize(rng.standard_normal((min(chunk_rows, rows - r), cols), dtype=np.float32), q8)
                          for r in range(0, rows, chunk_rows)])
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_token_list([f"token{i}" for i in range(rows)])
    writer.add_token_scores([0.0] * rows)
    writer.add_token_types([1] * rows)
    writer.add_tensor("output.weight", raw, raw_dtype=q8)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return rows * cols * 4


def plain_read_seconds(path: Path, buffer_mb: int = 16) -> float:
    """Seconds for a sequential read of every byte of ``path``."""
    buf = bytearray(buffer_mb * 2**20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def plain_copy_seconds(path: Path, target: Path, buffer_mb: int = 16) -> float:
    """Seconds to read ``path`` and write its bytes to ``target`` (then removed)."""
    buf = bytearray(buffer_mb * 2**20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
        while n := src.readinto(buf):
            dst.write(memoryview(buf)[:n])
    seconds = time.perf_counter() - t0
    target.unlink()
    return seconds


def extract_in_child(source: Path, store: Path, compressor: str, workers: int, tensor: str = "W") -> dict:
    """Run one extraction in a fresh interpreter; its timing and RSS as it reports them."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(source), str(store), compressor, str(workers), tensor],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(workdir: Path, size_mb: int, cols: int, compressors: list[str], workers: int,
               fmt: str = "safetensors") -> list[dict]:
    rows = size_mb * 2**20 // (4 * cols)
    source = workdir / f"W_{size_mb}mb.{fmt}"
    nbytes = (write_gguf_matrix if fmt == "gguf" else write_matrix)(source, rows, cols)
    tensor = "lm_head" if fmt == "gguf" else "W"
    plain_read_seconds(source)  # warm the page cache, as the extraction will find it
    results = []
    for compressor in compressors:
        store = workdir / f"store_{size_mb}_{compressor}"
        read_before = plain_read_seconds(source)
        child = extract_in_child(source, store, compressor, workers, tensor)
        read_after = plain_read_seconds(source)
        read_s = min(read_before, read_after)
        copy_s = plain_copy_seconds(source, workdir / "copy.bin")
        results.append({
            "format": fmt, "source_mb": source.stat().st_size / 2**20,
            "shape": [rows, cols], "matrix_mb": nbytes / 2**20, "compressor": compressor,
            "peak_rss_mb": child["peak_kb"] / 1024, "import_rss_mb": child["base_kb"] / 1024,
            "peak_share": child["peak_kb"] * 1024 / nbytes,
            "growth_share": (child["peak_kb"] - child["base_kb"]) * 1024 / nbytes,
            "throughput_ratio": read_s / child["seconds"], "copy_ratio": copy_s / child["seconds"],
            "extract_mb_s": nbytes / 2**20 / child["seconds"], "plain_read_mb_s": nbytes / 2**20 / read_s,
            "store_mb": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20,
        })
        shutil.rmtree(store)
    source.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1024, 512], help="Matrix sizes in MiB.")
    parser.add_argument("--cols", type=int, default=2048, help="Matrix columns (d_in); rows follow from the size.")
    parser.add_argument("--compressors", nargs="+", default=["none", "zstd"], choices=["none", "zstd", "blosc"])
    parser.add_argument("--workers", type=int, default=512, help="Tiles per grid.")
    parser.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors",
                        help="Source: float32 safetensors, or Q8_0 GGUF with a vocabulary of `rows` tokens.")
    parser.add_argument("--dir", default=None, help="Working folder (default: a temporary one, removed after).")
    parser.add_argument("--json", action="store_true", help="Print the results as one JSON object.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_extract_") as d:
        results = [r for size in args.sizes_mb
                   for r in bench_size(Path(d), size, args.cols, args.compressors, args.workers, args.format)]
    if args.json:
        print(json.dumps({"results": results}))
        return
    print(f"{'format':>11} {'shape':>14} {'MiB':>6} {'codec':>5} {'peak RSS':>9} {'share':>6} {'growth':>7} "
          f"{'extract MB/s':>12} {'read MB/s':>9} {'ratio':>6} {'copy ratio':>10}")
    for r in results:
        print(f"{r['format']:>11} {'×'.join(map(str, r['shape'])):>14} {r['matrix_mb']:6.0f} {r['compressor']:>5} "
              f"{r['peak_rss_mb']:7.0f}MB {r['peak_share']:6.1%} {r['growth_share']:7.1%} "
              f"{r['extract_mb_s']:12.0f} {r['plain_read_mb_s']:9.0f} {r['throughput_ratio']:6.3f} "
              f"{r['copy_ratio']:10.3f}")


if __name__ == "__main__":
    main()
