"""Verdicts over MQTT: the node's contract with the sortation controller.

Topic tree (`topics`), payloads and strict input parsing (`payloads`, with the
JSON Schemas in ``schemas/`` and the AsyncAPI description in ``asyncapi.yaml``),
the durable outbox (`outbox`), the paho-mqtt client (`mqtt`) and an embedded
Mosquitto broker for tests and the demo (`broker`).
"""

from pathlib import Path

from edge.publish.broker import BrokerError, BrokerTls, MosquittoBroker
from edge.publish.connection import BrokerConfigError, Credentials, load_credentials
from edge.publish.mqtt import AckedVerdict, PublisherMetrics, VerdictPublisher
from edge.publish.outbox import Outbox, OutboxRow
from edge.publish.payloads import (
    MAX_INPUT_BYTES,
    REJECT_REASONS,
    SCHEMA_VERSION,
    InputRejected,
    parse_feedback,
    parse_induct,
    verdict_payload,
)
from edge.publish.topics import Topics

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
ASYNCAPI_FILE = SCHEMA_DIR.parent / "asyncapi.yaml"

__all__ = [
    "ASYNCAPI_FILE", "MAX_INPUT_BYTES", "REJECT_REASONS", "SCHEMA_DIR", "SCHEMA_VERSION",
    "AckedVerdict", "BrokerConfigError", "BrokerError", "BrokerTls", "Credentials",
    "InputRejected", "MosquittoBroker", "Outbox", "OutboxRow", "PublisherMetrics", "Topics",
    "VerdictPublisher", "load_credentials", "parse_feedback", "parse_induct", "verdict_payload",
]
