"""Regenerate ``sample_data/gated_pairs``, the small pairs store the demo and quick tests use.

    python sample_data/make_sample.py

Deterministic: the same settings give the same rows bit for bit (see :mod:`prismoe_store.data.synth`),
so the committed store can always be checked against a fresh regeneration
(``tests/test_synth.py::test_sample_data_matches_a_regeneration``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from prismoe_store.data.synth import SynthSpec, synthesize  # noqa: E402
from prismoe_store.stores.formats import StoreOptions  # noqa: E402

PATH = HERE / "gated_pairs"
SPEC = SynthSpec(rows=3072, d_in=64, d_out=256, kind="gated", noise=0.01, seed=0, regions=4)
ROWS_PER_CHUNK = 1024
OPTIONS = StoreOptions(compressor="zstd", level=3)


def make(path: Path = PATH) -> Path:
    """Write the sample store to ``path`` (replacing what is there)."""
    store = synthesize(str(path), SPEC, rows_per_chunk=ROWS_PER_CHUNK, options=OPTIONS, overwrite=True)
    lock = Path(path) / ".append.lock"  # the appenders' lock file: nothing to commit
    if lock.exists():
        os.remove(lock)
    return Path(store.url)


if __name__ == "__main__":
    out = make()
    print(f"wrote {SPEC.rows} {SPEC.kind} pairs {SPEC.d_in}→{SPEC.d_out} to {out}")
