"""Fixtures for the publisher tests: a started node-side publisher and a collector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from edge.clock import WallClock
from edge.config import MqttConfig, NodeConfig
from edge.publish.mqtt import AckedVerdict, VerdictPublisher
from tests.publish.helpers import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from edge.publish.broker import MosquittoBroker
    from edge.types import Announcement, Feedback


@dataclass
class NodeSide:
    """A publisher plus everything it handed to the node."""

    publisher: VerdictPublisher
    announcements: list[Announcement] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    acked: list[AckedVerdict] = field(default_factory=list)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeSide]]:
    """`node_factory(broker_or_url, **publisher_kwargs)`: a started publisher (stopped after)."""
    made: list[VerdictPublisher] = []

    def make(broker: MosquittoBroker | str, *, mqtt: MqttConfig | None = None,
             node: NodeConfig | None = None, outbox: Path | None = None, connect: bool = True,
             **kwargs: Any) -> NodeSide:
        url = broker if isinstance(broker, str) else broker.url
        cfg = mqtt or MqttConfig(url=url, keepalive_s=5)
        side = NodeSide(publisher=None)  # type: ignore[arg-type]
        pub = VerdictPublisher(cfg, node or NodeConfig(), outbox or tmp_path / "outbox.db",
                               WallClock(), side.announcements.append, side.feedback.append,
                               side.acked.append, **kwargs)
        side.publisher = pub
        made.append(pub)
        pub.start()
        if connect:
            assert pub.wait_connected(5), pub.last_error
        return side

    yield make
    for pub in made:
        pub.stop(flush_timeout_s=0.5)


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Collector]]:
    """`collector_factory(broker, topic="#")`: an independent subscriber (closed after)."""
    made: list[Collector] = []

    def make(broker: MosquittoBroker, topic: str = "#", client_id: str = "test-collector",
             login: tuple[str, str] | None = None) -> Collector:
        c = Collector(broker, topic, client_id, login)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
