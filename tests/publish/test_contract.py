"""The contract documents: JSON Schemas and the AsyncAPI description agree with the code."""

from __future__ import annotations

import json

import jsonschema  # type: ignore[import-untyped]
import yaml

from edge.publish import ASYNCAPI_FILE, SCHEMA_DIR
from edge.publish.payloads import REJECT_REASONS
from edge.publish.topics import Topics
from edge.site.gallery_message import gallery_topic
from edge.types import DamageType, Reason

SCHEMAS = ("verdict", "status", "event", "induct", "feedback", "gallery", "shadow")


def _schema(name: str) -> dict[str, object]:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    """Each payload schema is itself valid JSON Schema 2020-12 and forbids unknown keys."""
    for name in SCHEMAS:
        schema = _schema(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False, name


def test_asyncapi_describes_the_topic_tree_the_node_uses() -> None:
    """AsyncAPI 3: one channel per topic, addresses matching `Topics` (the shared gallery's:
    `gallery_topic`), each message's payload pointing at an existing schema file, directions
    and MQTT bindings as implemented."""
    doc = yaml.safe_load(ASYNCAPI_FILE.read_text(encoding="utf-8"))
    assert doc["asyncapi"].startswith("3.")
    topics = Topics("conveyor-vision", "line-1", "edge-01")
    site = {"siteGallery": gallery_topic("conveyor-vision", "site-1", "P-BOX-S", "ab12@128")}
    for name, channel in doc["channels"].items():
        address = channel["address"].format(prefix="conveyor-vision", lineId="line-1",
                                            nodeId="edge-01", siteId="site-1",
                                            productId="P-BOX-S", embeddingModelId="ab12@128")
        assert address == (site[name] if name in site else getattr(topics, name)), name
    for message in doc["components"]["messages"].values():
        ref = message["payload"]["schema"]["$ref"]
        assert (ASYNCAPI_FILE.parent / ref).is_file(), ref
    actions = {(op["channel"]["$ref"].rsplit("/", 1)[1], op["action"])
               for op in doc["operations"].values()}
    assert actions == {("induct", "receive"), ("feedback", "receive"), ("verdict", "send"),
                       ("status", "send"), ("events", "send"), ("shadow", "send"),
                       ("siteGallery", "send"), ("siteGallery", "receive")}
    assert doc["operations"]["sendStatus"]["bindings"]["mqtt"]["retain"] is True
    assert doc["operations"]["sendSiteGallery"]["bindings"]["mqtt"]["retain"] is True
    assert all(op["bindings"]["mqtt"]["qos"] == (0 if name == "sendShadow" else 1)
               for name, op in doc["operations"].items())
    assert "(`node_id`, `seq`)" in doc["info"]["description"]


def test_schema_enums_cover_the_code() -> None:
    """Every reason code and damage type the node can publish is in the verdict schema."""
    props = _schema("verdict")["properties"]
    assert isinstance(props, dict)
    assert set(props["reasons"]["items"]["enum"]) == {r.value for r in Reason}
    damage_types = props["damage"]["items"]["properties"]["type"]["enum"]
    assert set(damage_types) == {d.value for d in DamageType}
    doc = yaml.safe_load(ASYNCAPI_FILE.read_text(encoding="utf-8"))["info"]["description"]
    for reason in ("64 KiB", "duplicate item ID", "unknown product", "unknown item"):
        assert reason in doc
    assert len(REJECT_REASONS) == len(set(REJECT_REASONS))


def test_the_shadow_schema_repeats_the_verdicts_parts_exactly() -> None:
    """Both verdicts of a shadow message are in the verdict message's own terms: its copies of
    the verdict's decision, reasons, scores and versions are the verdict schema's (only the
    descriptions differ), so a change to the one shows here until the other follows."""
    verdict = _schema("verdict")["properties"]
    shadow = _schema("shadow")["properties"]
    assert isinstance(verdict, dict)
    assert isinstance(shadow, dict)

    def bare(part: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in part.items() if k != "description"}

    for side in ("production", "candidate"):
        for part in ("decision", "reasons", "scores", "threshold_version", "model_versions"):
            assert bare(shadow[side]["properties"][part]) == bare(verdict[part]), (side, part)
