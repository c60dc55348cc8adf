"""Shared fixtures.

Broker fixtures start Debian's ``mosquitto`` on a free 127.0.0.1 port from a
generated config in the test's ``tmp_path`` (see `edge.publish.broker`) and
stop it afterwards, whatever the test did to it:

* ``mosquitto``: a plain broker (anonymous, MQTT 3.1.1 and 5, no persistence).
  Its ``url`` goes straight into ``MqttConfig(url=...)``; ``kill()``,
  ``restart()`` and ``stop()`` simulate crashes and outages.
* ``mosquitto_factory``: ``mosquitto_factory(tls=..., persistence=True,
  extra_config="...")`` for brokers with TLS, persistence or ACLs; started
  before it is returned.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

import pytest

from edge.publish.broker import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

#: `CV_LONG_CHECKS=1` (tools/long_checks.sh) runs the acceptance checks at full size; the
#: suite runs them smaller, with the same criteria, to stay under 10 minutes on 2 cores.
LONG_CHECKS = os.environ.get("CV_LONG_CHECKS") == "1"


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start brokers on demand; every one is stopped at teardown."""
    if shutil.which("mosquitto") is None:
        pytest.skip("Debian's mosquitto is not installed")
    brokers: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"broker-{len(brokers)}", **kwargs)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A running anonymous broker on a free loopback port."""
    return mosquitto_factory()
