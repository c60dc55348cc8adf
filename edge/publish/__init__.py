"""Verdicts over MQTT: the node's contract with the sortation controller.

Topic tree (`topics`), payloads and strict input parsing (`payloads`, with the
JSON Schemas in ``schemas/`` and the AsyncAPI description in ``asyncapi.yaml``),
the durable outbox (`outbox`), the paho-mqtt client (`mqtt`) and an embedded
Mosquitto broker for tests and the demo (`broker`).
"""

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
ASYNCAPI_FILE = SCHEMA_DIR.parent / "asyncapi.yaml"
