"""Typed store records: to_dict/from_dict round trips, parse_* refusals, and the stored layout kept."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prismoe_store.errors import CorruptStoreError, StoreError
from prismoe_store.grid import plan_grid
from prismoe_store.sources.records import FINGERPRINT_METHOD, SourceStamp
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.records import (
    FitMetrics,
    FitRecord,
    GatesRecord,
    Score,
    SplitRecord,
    TensorRecord,
    parse_count,
    parse_dtype,
    parse_number,
    parse_texts,
)
from prismoe_store.stores.weights import WeightsStore

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), names,
                      st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner,
                                                                                                     max_size=3),
                           max_leaves=8)
counts = st.integers(0, 2**40)
seconds = st.floats(0, 1e6, allow_nan=False)
fractions = st.floats(0, 1, exclude_max=True, allow_nan=False)


@st.composite
def fit_records(draw) -> FitRecord:
    settings_ = draw(st.dictionaries(names.filter(lambda k: k not in ("holdout", "seed")), json_values, max_size=4))
    settings_.update({"holdout": draw(fractions), "seed": draw(counts)})
    maybe = lambda s: draw(st.none() | s)  # noqa: E731
    return FitRecord(settings=settings_, pairs=maybe(st.dictionaries(names, json_values, max_size=3)),
                     plan=maybe(st.dictionaries(names, counts, max_size=6)),
                     ridge=maybe(st.dictionaries(st.sampled_from(["train", "sub"]), seconds)),
                     counts=maybe(st.dictionaries(st.sampled_from(["train", "sub", "holdout"]), counts)),
                     timings=maybe(st.dictionaries(names, seconds, max_size=3)),
                     warnings=tuple(draw(st.lists(names, max_size=3))))


scores = st.builds(Score, st.floats(allow_infinity=False), st.floats(allow_infinity=False))


def _json(d) -> str:
    return json.dumps(d, sort_keys=True)  # NaN-safe comparison (NaN != NaN)


@settings(max_examples=60, deadline=None)
@given(fit_records())
def test_fit_record_round_trip(r):
    d = r.to_dict()
    assert FitRecord.from_dict(json.loads(json.dumps(d))) == r  # as the store keeps it: JSON
    assert set(d) <= {"settings", "pairs", "plan", "ridge", "counts", "timings", "warnings"}
    assert r.holdout == r.settings["holdout"] and r.seed == r.settings["seed"]
    d["settings"]["seed"] = -1  # the record owns its data: changing the dict changes nothing in it
    assert r.seed >= 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.lists(scores, max_size=3), scores, st.lists(names, max_size=2))
def test_metrics_round_trip(rows, pipes, combined, warnings):
    m = FitMetrics(rows, tuple(pipes), combined, tuple(warnings))
    back = FitMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
    assert _json(back.to_dict()) == _json(m.to_dict())


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, json_values, max_size=4), st.none() | st.booleans(),
       st.none() | st.builds(SplitRecord, fractions, counts, names),
       st.none() | st.dictionaries(names, json_values, max_size=3),
       st.none() | st.dictionaries(names, json_values, max_size=3))
def test_gates_record_round_trip(settings_, complete, split, metrics, held_out):
    g = GatesRecord(settings_, complete, split, metrics, held_out)
    d = g.to_dict()
    assert GatesRecord.from_dict(json.loads(json.dumps(d))) == g
    assert ("complete" in d) == (complete is not None) and g.finished == (complete is not False)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([1, 4, 16]),
       st.sampled_from(["float32", "float16", "float64"]), st.booleans(), st.booleans(),
       st.dictionaries(names.map(lambda k: "source_" + k), json_values, max_size=3))
def test_tensor_record_round_trip(d_in, d_out, workers, dtype, complete, stamped, source):
    stamp = SourceStamp("/m/model.safetensors", 1234, "sha256:ab", FINGERPRINT_METHOD) if stamped else None
    r = TensorRecord("lm_head.weight", plan_grid(d_in, d_out, workers), dtype, complete, stamp, source)
    d = json.loads(json.dumps(r.to_dict()))
    assert TensorRecord.from_dict(d) == r
    assert d["grid"] == r.grid.to_dict() and d["dtype"] == dtype and d["complete"] is complete
    assert ("source_fingerprint" in d) == stamped


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, needle", [
    ("counts", {"train": -1}, "counts['train']"),
    ("counts", {"train": True}, "integer"),
    ("counts", {"train": 1.5}, "integer"),
    ("ridge", {"train": -0.1}, "ridge['train']"),
    ("ridge", {"train": math.inf}, "finite"),
    ("timings", {"solve_s": math.nan}, "finite"),
    ("plan", {"rows": "many"}, "plan['rows']"),
    ("warnings", "one warning", "list of strings"),
    ("warnings", [3], "warnings[0]"),
    ("settings", [1, 2], "mapping"),
    ("settings", {"holdout": -0.5}, "holdout"),
    ("settings", {"seed": -1}, "seed"),
    ("pairs", "p.zarr", "mapping"),
])
def test_fit_record_refuses_bad_values(field, value, needle):
    base = {"settings": {"holdout": 0.1, "seed": 0}}
    with pytest.raises(StoreError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        FitRecord(**{**base, field: value})
    with pytest.raises(StoreError):
        FitRecord.from_dict({**base, field: value})


@pytest.mark.parametrize("make", [
    lambda: GatesRecord.from_dict({"settings": {}, "complete": "yes"}),
    lambda: GatesRecord.from_dict({"settings": {}, "oops": 1}),
    lambda: GatesRecord.from_dict({"settings": 3}),
    lambda: GatesRecord.from_dict({"settings": {}, "split": {"holdout": 1.0, "seed": 0}}),
    lambda: GatesRecord.from_dict({"settings": {}, "split": {"seed": 0}}),
    lambda: GatesRecord(settings={}, split={"holdout": 0.1, "seed": 0}),
    lambda: SplitRecord(0.1, -3),
    lambda: FitRecord.from_dict({"settings": {}, "unknown": 1}),
    lambda: FitMetrics.from_dict({"holdout_rows": 3, "pipes": [], "combined": {"rel_err": 0.1}}),
    lambda: FitMetrics.from_dict({"holdout_rows": -3, "pipes": [], "combined": {"rel_err": 0.1, "r2": 0.9}}),
    lambda: FitMetrics.from_dict({"holdout_rows": 3, "pipes": 5, "combined": {"rel_err": 0.1, "r2": 0.9}}),
    lambda: Score("0.1", 0.2),
    lambda: TensorRecord.from_dict({"tensor": "t", "grid": plan_grid(4, 4, 1).to_dict(), "dtype": "f4"}),
    lambda: TensorRecord.from_dict({"tensor": "t", "grid": {"d_in": 4}, "dtype": "float32"}),
    lambda: TensorRecord.from_dict({"tensor": "t", "grid": plan_grid(4, 4, 1).to_dict(), "dtype": "float32",
                                    "complete": 1}),
    lambda: TensorRecord.from_dict({"tensor": "t", "grid": plan_grid(4, 4, 1).to_dict(), "dtype": "float32",
                                    "source_fingerprint": "sha256:ab"}),  # a stamp without its size
    lambda: TensorRecord("t", plan_grid(4, 4, 1), "float32", source={"dtype": "float16"}),
    lambda: TensorRecord.from_dict({"grid": plan_grid(4, 4, 1).to_dict(), "dtype": "float32"}),
])
def test_records_refuse_bad_values(make):
    with pytest.raises(StoreError):
        make()


@given(st.one_of(st.booleans(), st.floats(), names, st.integers(max_value=-1)))
def test_parse_count_refuses_what_is_not_a_count(value):
    with pytest.raises(StoreError):
        parse_count(value, "n")


@given(st.one_of(st.booleans(), names, st.none(), st.lists(st.integers(), max_size=2)))
def test_parse_number_refuses_what_is_not_a_number(value):
    with pytest.raises(StoreError):
        parse_number(value, "x")


def test_parse_helpers_accept_what_they_should():
    assert parse_count(np.int64(3), "n") == 3 and parse_number(np.float32(0.5), "x") == 0.5
    assert math.isnan(parse_number(math.nan, "x")) and parse_texts(["a", "b"], "w") == ("a", "b")
    assert parse_dtype("float16", "d") == "float16"


# -- the stores' typed accessors ---------------------------------------------------------------------


def test_adapter_accessors_read_the_stored_layout(tmp_path):
    """Attributes written as plain dicts (the layout of docs/store-format.md, as older versions wrote
    them) read through the typed accessors, and a damaged one is a CorruptStoreError."""
    a = AdapterStore.create(tmp_path / "a", grids=[plan_grid(4, 4, 2)])
    assert (a.fit_record(), a.metrics_record(), a.gates_record(), a.gate_settings()) == (None, None, None, {})
    fit = {"settings": {"mode": "joint", "holdout": 0.2, "seed": 5}, "pairs": {"url": "p", "rows": 10},
           "plan": {"rows": 10, "block_rows": 10, "tasks": 1, "group_cols": 4, "metric_cols": 4, "hold_cap": 2},
           "ridge": {"train": 0.5, "sub": 0.5}, "counts": {"train": 8, "sub": 5, "holdout": 2},
           "timings": {"statistics_s": 0.1}, "warnings": ["train rows: ill-conditioned"]}
    metrics = {"holdout_rows": 2, "pipes": [{"rel_err": 0.1, "r2": 0.9}], "combined": {"rel_err": 0.1, "r2": 0.9},
               "warnings": []}
    gates = {"complete": True, "settings": {"sparsity": 0.5}, "split": {"holdout": 0.2, "seed": 5, "source": "fit"},
             "metrics": {"best_epoch": 2}}
    a.update_attrs(fit=fit, metrics=metrics, gates=gates)
    b = AdapterStore.open(tmp_path / "a")
    assert b.fit_record().to_dict() == fit and (b.fit_record().holdout, b.fit_record().seed) == (0.2, 5)
    assert b.metrics_record().to_dict() == metrics and b.metrics_record().combined.r2 == 0.9
    assert b.gates_record().to_dict() == gates and b.gate_settings() == {"sparsity": 0.5}
    assert b.gates_record().split == SplitRecord(0.2, 5, "fit")
    a.update_attrs(gates={"settings": {"epochs": 3}, "held_out": {"top1": 0.5}})  # a head's band gate
    assert AdapterStore.open(tmp_path / "a").gates_record().finished
    a.update_attrs(fit={**fit, "counts": {"train": -5}})
    with pytest.raises(CorruptStoreError, match="'fit' attribute is damaged"):
        AdapterStore.open(tmp_path / "a").fit_record()


def test_weights_record_is_what_begin_stored(tmp_path):
    s = WeightsStore.create(tmp_path / "w")
    stamp = SourceStamp("/m.safetensors", 10, "sha256:cd", FINGERPRINT_METHOD)
    source = {"source_format": "safetensors", "source_tensor": "lm_head.weight", "source_bias": None,
              **stamp.as_attrs()}
    s.write_matrix("lm_head", np.ones((4, 6), np.float32), plan_grid(6, 4, 2), source=source)
    r = WeightsStore.open(tmp_path / "w").record("lm_head")
    assert (r.tensor, r.dtype, r.complete, r.stamp, r.grid) == ("lm_head", "float32", True, stamp, plan_grid(6, 4, 2))
    assert r.source == {k: v for k, v in source.items() if not k.startswith(("source_fingerprint", "source_size"))
                        and k != "source"}
    assert r.to_dict() == s.info("lm_head")  # the stored attributes, exactly
    with pytest.raises(StoreError, match="dtype"):
        s.begin("bad", plan_grid(6, 4, 2), source={"dtype": "float16"})
