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

Under pytest-xdist, `tests/xdist_scheduling.py` decides which worker runs what.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from edge.commands.log_stream import log_to_stderr
from edge.publish.broker import MosquittoBroker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: `CV_LONG_CHECKS=1` (tools/long_checks.sh) runs the acceptance checks at full size; the
#: suite runs them smaller, with the same criteria, to stay under 10 minutes on 2 cores.
LONG_CHECKS = os.environ.get("CV_LONG_CHECKS") == "1"
#: tmpfs, where fsync costs nothing
SHM = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    # Every test logs as the commands do (JSON lines on the stderr of the moment; every level,
    # as structlog's default), whichever test ran before it in this process: structlog's
    # configuration is global, and its default (a console renderer drawing each exception's
    # locals) took seconds per logged exception, enough for the errors of a failing stage to
    # come further apart than its stall time (tests/pipeline/test_node.py) when no command
    # run earlier in the process had configured it: under pytest-xdist, or run alone.
    log_to_stderr("debug")
    if config.pluginmanager.hasplugin("xdist"):
        from tests.xdist_scheduling import XdistScheduling

        # Registered now, it still gets this pytest_configure call (a historic hook).
        config.pluginmanager.register(XdistScheduling(), "cv-xdist-scheduling")


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


@pytest.fixture
def shm_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """An empty private folder on tmpfs where there is one (else `tmp_path`), removed after:
    for tests of code that fsyncs every file it writes, which a disk makes slow (a second per
    hundred files, or more when the disk is busy) and which the test does not measure."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=SHM, prefix="cv-test-") as folder:
        yield Path(folder)
