"""The node under systemd: when READY goes out while cameras come up or give up."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.config import load_config
from edge.service import NodeService
from edge.sources import SourceError
from edge.systemd import SystemdNotifier


@dataclass
class _Publisher:
    connected: bool = True


@dataclass
class _Node:
    """What `_wait_ready` reads of a node: the broker connection and each camera's state."""

    states: dict[str, str]
    publisher: _Publisher = field(default_factory=_Publisher)

    def camera_states(self) -> dict[str, str]:
        return dict(self.states)


def _service(tmp_path: Path) -> tuple[NodeService, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(1.0)
    service = NodeService(load_config(None))
    service.notifier = SystemdNotifier(str(tmp_path / "notify.sock"))
    return service, sock


def test_ready_waits_for_a_camera_that_is_still_coming_up_and_says_so(tmp_path: Path) -> None:
    service, sock = _service(tmp_path)
    node = _Node({"top": "streaming", "angled": "waiting"})
    stop = threading.Event()
    waiter = threading.Thread(target=service._wait_ready, args=(node, stop))  # type: ignore[arg-type]
    waiter.start()
    try:
        said = sock.recv(4096).decode()
        assert "EXTEND_TIMEOUT_USEC=" in said
        assert "waiting for cameras angled" in said
        assert waiter.is_alive()
        node.states["angled"] = "streaming"
        waiter.join(2.0)
        assert not waiter.is_alive()
    finally:
        stop.set()
        waiter.join(2.0)
        sock.close()


def test_a_camera_that_gave_up_does_not_hold_ready_back_for_ever(tmp_path: Path) -> None:
    """It used to: the unit stayed "activating" (the timeout extended every 0.2 s), so systemd
    never restarted it and the update gate rolled back a good release. The others inspect."""
    service, sock = _service(tmp_path)
    node = _Node({"top": "streaming", "angled": "failed: camera angled is gone"})
    done = threading.Event()

    def wait() -> None:
        service._wait_ready(node, threading.Event())  # type: ignore[arg-type]
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    assert done.wait(2.0)
    sock.close()


def test_every_camera_given_up_fails_the_start_so_systemd_tries_again(tmp_path: Path) -> None:
    service, sock = _service(tmp_path)
    node = _Node({"top": "failed: no frames", "angled": "failed: unplugged"})
    with pytest.raises(SourceError, match="no camera streams: top failed: no frames"):
        service._wait_ready(node, threading.Event())  # type: ignore[arg-type]
    sock.close()
