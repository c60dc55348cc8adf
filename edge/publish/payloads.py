"""JSON payloads: what the node sends and the strict parsers for what it receives.

Every payload carries ``schema_version`` (`SCHEMA_VERSION`); the JSON Schema
files in ``edge/publish/schemas/`` are the contract and the tests validate
every message the node sends against them. Times are integer milliseconds
since the Unix epoch. Inputs are parsed strictly: unknown keys, wrong types,
missing fields, non-finite numbers, duplicate keys and payloads over
`MAX_INPUT_BYTES` are rejected with an `InputRejected` naming the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from edge.types import Announcement, Feedback, FeedbackKind, Verdict

SCHEMA_VERSION = 1
MAX_INPUT_BYTES = 64 * 1024
MAX_ID_LEN = 128
MAX_NOTE_LEN = 2000
#: IDs: no control characters (C0, DEL, C1), no leading or trailing white space.
#: The JSON Schemas use the same pattern.
_EDGE = r"[^\x00-\x1f\x7f-\x9f\s]"
ID_REGEX = rf"^{_EDGE}(?:[^\x00-\x1f\x7f-\x9f]*{_EDGE})?$"
ID_PATTERN = re.compile(ID_REGEX)
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = ("confirmed_damage", "false_positive",
                                            "packaging_changed")

#: Every reason an input can be rejected for (the `reason` label of the counter).
REJECT_REASONS = (
    "too_large", "not_utf8", "malformed_json", "not_an_object", "missing_field",
    "unknown_field", "wrong_type", "bad_value", "unsupported_schema_version",
    "unknown_product", "duplicate_item", "unknown_item",
)


class InputRejected(ValueError):  # noqa: N818 - an outcome the caller counts, not a bug
    """An input message the node refuses: `reason` is one of `REJECT_REASONS`."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        assert reason in REJECT_REASONS, reason
        self.reason = reason
        self.field = field
        super().__init__(message)


def _ms(value: float | None) -> int | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value)


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def dumps(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")


def verdict_payload(verdict: Verdict, *, node_id: str, line_id: str, seq: int,
                    published_ms: float) -> dict[str, object]:
    """The ``…/verdict`` message. The anomaly map is never published."""
    scores: dict[str, object] | None = None
    if verdict.scores is not None:
        s = verdict.scores
        scores = {
            "damage": _num(s.damage), "anomaly": _num(s.anomaly),
            "geometry": _num(s.geometry), "fused": _num(s.fused), "ood": _num(s.ood),
            "per_type": {k: v for k, v in ((k, _num(v)) for k, v in s.per_type.items())
                         if v is not None},
        }
    damage = [
        {"type": f.type.value, "probability": _num(f.probability) or 0.0,
         "box_px": list(f.box_px) if f.box_px is not None else None}
        for f in verdict.findings
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "node_id": node_id,
        "line_id": line_id,
        "seq": seq,
        "item_id": verdict.item_id,
        "product_id": verdict.product_id,
        "decision": verdict.decision.value,
        "reasons": [r.value for r in verdict.reasons],
        "scores": scores,
        "threshold_version": verdict.threshold_version,
        "model_versions": dict(verdict.model_versions),
        "damage": damage,
        "timestamps": {"captured": _ms(verdict.captured_ms), "decided": _ms(verdict.decided_ms),
                       "published": _ms(published_ms)},
        "deadline": _ms(verdict.deadline_ms),
        "late": verdict.late,
        "fail_safe": verdict.fail_safe,
        "snapshot_id": verdict.snapshot_id,
    }


def status_payload(state: str, *, node_id: str, line_id: str, now_ms: float,
                   versions: Mapping[str, str], health: Mapping[str, object]) -> dict[str, object]:
    """The retained ``…/status`` message (`state` is ``online`` or ``offline``)."""
    return {
        "schema_version": SCHEMA_VERSION, "node_id": node_id, "line_id": line_id,
        "state": state, "timestamp": _ms(now_ms), "versions": dict(versions),
        "health": dict(health),
    }


def event_payload(kind: str, detail: Mapping[str, object], *, node_id: str, line_id: str,
                  now_ms: float) -> dict[str, object]:
    """A ``…/events`` message: diagnostics, rejected input, periodic health."""
    return {
        "schema_version": SCHEMA_VERSION, "node_id": node_id, "line_id": line_id,
        "kind": kind, "timestamp": _ms(now_ms), "detail": dict(detail),
    }


# --- inputs -------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InputRejected("malformed_json", f"duplicate key {key!r}", key)
        out[key] = value
    return out


def _reject_constant(name: str) -> float:
    raise InputRejected("malformed_json", f"{name} is not a JSON number")


def load_object(raw: bytes) -> dict[str, Any]:
    """Decode a payload into a JSON object (size, UTF-8 and syntax checks)."""
    if len(raw) > MAX_INPUT_BYTES:
        raise InputRejected("too_large", f"{len(raw)} bytes > {MAX_INPUT_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRejected("not_utf8", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except InputRejected:
        raise
    except (ValueError, RecursionError) as exc:
        raise InputRejected("malformed_json", f"not JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise InputRejected("not_an_object", f"a JSON {type(data).__name__}, expected an object")
    return data


def _check_keys(data: Mapping[str, Any], required: Collection[str],
                optional: Collection[str]) -> None:
    for key in required:
        if key not in data:
            raise InputRejected("missing_field", f"missing {key!r}", key)
    for key in data:
        if key not in required and key not in optional:
            raise InputRejected("unknown_field", f"unknown field {key!r}", key)
    version = data["schema_version"]
    if not isinstance(version, int | float) or isinstance(version, bool):
        raise InputRejected("wrong_type", "schema_version must be an integer", "schema_version")
    if version != SCHEMA_VERSION:
        raise InputRejected("unsupported_schema_version",
                            f"schema_version {version}, this node reads {SCHEMA_VERSION}",
                            "schema_version")


def _identifier(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise InputRejected("wrong_type", f"{key} must be a string", key)
    if len(value) > MAX_ID_LEN or not ID_PATTERN.fullmatch(value):
        raise InputRejected("bad_value", f"{key} must be 1-{MAX_ID_LEN} characters, no control "
                            "characters, no surrounding white space", key)
    return value


def _number(data: Mapping[str, Any], key: str, lo: float, hi: float) -> float:
    value = data[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InputRejected("wrong_type", f"{key} must be a number", key)
    if not lo <= value <= hi:  # compare before float(): huge ints overflow
        raise InputRejected("bad_value", f"{key} must be between {lo:g} and {hi:g}", key)
    return float(value)


def parse_induct(raw: bytes, received_ms: float,
                 known_products: Collection[str] | None = None) -> Announcement:
    """An ``…/induct`` message -> `Announcement` (see schemas/induct.schema.json).

    ``induct_time_ms`` (wall clock at the induct point) or ``belt_position_mm``
    (how far past the induct point the item was when the message was sent) or
    both; with only a position, the receipt time stands in for the induct time.
    """
    data = load_object(raw)
    _check_keys(data, ("schema_version", "item_id", "product_id"),
                ("induct_time_ms", "belt_position_mm"))
    item_id = _identifier(data, "item_id")
    product_id = _identifier(data, "product_id")
    if "induct_time_ms" not in data and "belt_position_mm" not in data:
        raise InputRejected("missing_field", "need induct_time_ms or belt_position_mm",
                            "induct_time_ms")
    induct_ms = (_number(data, "induct_time_ms", 0.0, 2**53) if "induct_time_ms" in data
                 else received_ms)
    position = (_number(data, "belt_position_mm", 0.0, 1e6) if "belt_position_mm" in data
                else None)
    if known_products is not None and product_id not in known_products:
        raise InputRejected("unknown_product", f"product {product_id!r} is not in the catalogue",
                            "product_id")
    return Announcement(item_id=item_id, product_id=product_id, induct_time_ms=induct_ms,
                        belt_position_mm=position, received_ms=received_ms)


def parse_feedback(raw: bytes, received_ms: float,
                   known_products: Collection[str] | None = None) -> Feedback:
    """A ``…/feedback`` message -> `Feedback` (see schemas/feedback.schema.json).

    Whether the item is known is the caller's check (it needs the node's state).
    """
    data = load_object(raw)
    _check_keys(data, ("schema_version", "item_id", "kind"), ("product_id", "note"))
    item_id = _identifier(data, "item_id")
    kind = data["kind"]
    if not isinstance(kind, str):
        raise InputRejected("wrong_type", "kind must be a string", "kind")
    if kind not in FEEDBACK_KINDS:
        raise InputRejected("bad_value", f"kind must be one of {', '.join(FEEDBACK_KINDS)}",
                            "kind")
    product_id = _identifier(data, "product_id") if "product_id" in data else None
    if kind == "packaging_changed" and product_id is None:
        raise InputRejected("missing_field", "packaging_changed needs product_id", "product_id")
    if product_id is not None and known_products is not None and (
            product_id not in known_products):
        raise InputRejected("unknown_product", f"product {product_id!r} is not in the catalogue",
                            "product_id")
    note = data.get("note")
    if "note" in data and not isinstance(note, str):
        raise InputRejected("wrong_type", "note must be a string", "note")
    if note is not None and len(note) > MAX_NOTE_LEN:
        raise InputRejected("bad_value", f"note longer than {MAX_NOTE_LEN} characters", "note")
    return Feedback(item_id=item_id, kind=kind, product_id=product_id,
                    received_ms=received_ms, note=note)
