"""Payloads: what the node sends matches the JSON Schemas; what it reads is parsed strictly."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.publish.payloads import (
    MAX_INPUT_BYTES,
    InputRejected,
    dumps,
    event_payload,
    parse_feedback,
    parse_induct,
    status_payload,
    verdict_payload,
)
from edge.types import DamageFinding, DamageType, Decision, Reason, Scores, Verdict
from tests.publish.helpers import make_verdict, validator

finite = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
maybe_score = st.none() | finite | st.sampled_from([math.nan, math.inf])
ids = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s.isprintable())

verdicts = st.builds(
    Verdict,
    item_id=ids, product_id=st.none() | ids, decision=st.sampled_from(Decision),
    reasons=st.lists(st.sampled_from(Reason), unique=True, max_size=4).map(tuple),
    scores=st.none() | st.builds(Scores, damage=finite, anomaly=maybe_score,
                                 geometry=maybe_score, fused=finite,
                                 per_type=st.dictionaries(st.sampled_from(["crush", "tear"]),
                                                          finite)),
    threshold_version=st.text(max_size=10),
    model_versions=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    findings=st.lists(st.builds(DamageFinding, type=st.sampled_from(DamageType),
                                probability=finite,
                                box_px=st.none() | st.tuples(*[st.integers(0, 999)] * 4)),
                      max_size=3).map(tuple),
    captured_ms=st.none() | st.floats(1e12, 2e12), decided_ms=st.floats(1e12, 2e12),
    deadline_ms=st.floats(1e12, 2e12), late=st.booleans(), fail_safe=st.booleans(),
    snapshot_id=st.none() | st.text(max_size=10),
)


@settings(max_examples=150)
@given(verdict=verdicts, seq=st.integers(1, 2**40))
def test_every_verdict_payload_validates_against_the_schema(verdict: Verdict, seq: int) -> None:
    """Any verdict the node can hold serializes to JSON that the verdict schema accepts
    (non-finite scores become null), with the dedupe key (node_id, seq) present."""
    payload = json.loads(dumps(verdict_payload(verdict, node_id="edge-01", line_id="line-1",
                                               seq=seq, published_ms=1.7e12)))
    validator("verdict").validate(payload)
    assert (payload["node_id"], payload["seq"]) == ("edge-01", seq)


def test_anomaly_map_is_never_published() -> None:
    """The verdict's anomaly map stays on the node."""
    v = make_verdict("x")
    v = dataclasses.replace(v, anomaly_map=np.ones((4, 4), np.float32))
    payload = verdict_payload(v, node_id="n", line_id="l", seq=1, published_ms=1.0)
    assert "anomaly" not in json.dumps(payload).replace('"anomaly":', "")


def test_status_and_event_payloads_validate() -> None:
    """Status (online/offline) and event payloads match their schemas."""
    for state in ("online", "offline"):
        validator("status").validate(status_payload(
            state, node_id="edge-01", line_id="line-1", now_ms=1.7e12, versions={"node": "1"},
            health={"fps": 30.0}))
    validator("event").validate(event_payload("rejected_input", {"reason": "too_large"},
                                              node_id="edge-01", line_id="l", now_ms=1.7e12))
    with pytest.raises(jsonschema.ValidationError):
        validator("status").validate({"state": "maybe"})


def _induct(**fields: Any) -> bytes:
    base = {"schema_version": 1, "item_id": "I-1", "product_id": "box-small",
            "induct_time_ms": 1_700_000_000_000}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


@pytest.mark.parametrize(("raw", "reason"), [
    (b"x" * (MAX_INPUT_BYTES + 1), "too_large"),
    (b"\xc3\x28", "not_utf8"),
    (b'{"a": NaN}', "malformed_json"),
    (b'{"a": 1, "a": 2}', "malformed_json"),
    (b"[" * 100_00 + b"]" * 100_00, "malformed_json"),
    (b'"text"', "not_an_object"),
    (_induct(product_id=...), "missing_field"),
    (_induct(induct_time_ms=...), "missing_field"),
    (_induct(extra=1), "unknown_field"),
    (_induct(item_id=5), "wrong_type"),
    (_induct(induct_time_ms=True), "wrong_type"),
    (_induct(item_id=" padded"), "bad_value"),
    (_induct(item_id="tab\tinside"), "bad_value"),
    (_induct(item_id="x" * 129), "bad_value"),
    (_induct(induct_time_ms=10**400), "bad_value"),
    (_induct(schema_version=2), "unsupported_schema_version"),
    (_induct(product_id="teapot"), "unknown_product"),
])
def test_bad_induct_is_rejected_with_its_reason(raw: bytes, reason: str) -> None:
    """Each kind of bad induct raises InputRejected with the documented reason."""
    with pytest.raises(InputRejected) as err:
        parse_induct(raw, 5.0, known_products={"box-small"})
    assert err.value.reason == reason


def test_induct_with_only_a_belt_position_uses_the_receipt_time() -> None:
    """Without induct_time_ms the receipt time stands in; the position is kept."""
    ann = parse_induct(_induct(induct_time_ms=..., belt_position_mm=250), 123.0)
    assert (ann.induct_time_ms, ann.belt_position_mm, ann.received_ms) == (123.0, 250.0, 123.0)


def test_feedback_parsing() -> None:
    """Feedback kinds are checked; packaging_changed needs a product."""
    fb = parse_feedback(b'{"schema_version":1,"item_id":"A","kind":"packaging_changed",'
                        b'"product_id":"box-small","note":"new print"}', 9.0, {"box-small"})
    assert (fb.kind, fb.product_id, fb.note, fb.received_ms) == (
        "packaging_changed", "box-small", "new print", 9.0)
    with pytest.raises(InputRejected, match="kind"):
        parse_feedback(b'{"schema_version":1,"item_id":"A","kind":"meh"}', 0.0)


json_leaf = (st.none() | st.booleans() | st.integers(-5, 2**60) | st.floats(allow_nan=False)
             | st.text(max_size=6))
DROP = object()
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "schema_version": st.sampled_from([1, 1.0, 2, True, "1"]),
    "item_id": st.sampled_from(["A-1", " A", "", "x" * 129, "é", "a\nb", "ok\n"]) | json_leaf,
    "product_id": st.sampled_from(["box-small", "teapot", "x" * 128]) | json_leaf,
    "induct_time_ms": st.sampled_from([0, -1, 2**53, 2**53 + 2, 1.5e12]) | json_leaf,
    "belt_position_mm": st.sampled_from([0, 1e6, 1e6 + 1, -0.5]) | json_leaf,
    "kind": st.sampled_from(["confirmed_damage", "false_positive", "packaging_changed"])
    | json_leaf,
    "note": st.text(max_size=3) | json_leaf | st.just("n" * 2001),
    "other": json_leaf,
}
VALID_BASES = (
    {"schema_version": 1, "item_id": "A-1", "product_id": "box-small",
     "induct_time_ms": 1.5e12},
    {"schema_version": 1, "item_id": "A-1", "kind": "packaging_changed",
     "product_id": "box-small", "note": "x"},
)


@st.composite
def candidate(draw: st.DrawFn) -> dict[str, Any]:
    """A valid induct or feedback object with zero to three fields replaced or dropped."""
    data = dict(draw(st.sampled_from(VALID_BASES)))
    for key in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True)):
        value = draw(FIELD_VALUES[key] | st.just(DROP))
        if value is DROP:
            data.pop(key, None)
        else:
            data[key] = value
    return data


@settings(max_examples=400)
@given(data=candidate())
def test_parsers_accept_exactly_what_the_schemas_accept(data: dict[str, Any]) -> None:
    """For any JSON object the induct/feedback parser accepts it iff the published schema
    validates it: the schema is the contract, not folklore."""
    raw = json.dumps(data).encode()
    for name, parse in (("induct", parse_induct), ("feedback", parse_feedback)):
        try:
            parse(raw, 1.0)
            accepted = True
        except InputRejected:
            accepted = False
        assert accepted == validator(name).is_valid(data), (name, data)
