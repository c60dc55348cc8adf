"""The node's MQTT topic tree.

Everything lives under ``{prefix}/{line_id}/{node_id}/``::

    …/induct    in   the sortation controller announces an item
    …/feedback  in   people downstream report what an item really was
    …/verdict   out  one verdict per item (QoS 1, never retained)
    …/status    out  retained `online`/`offline` with versions and health
    …/events    out  diagnostics and rejected input (QoS 1, never retained)
    …/shadow    out  a candidate model set's verdict beside production's (QoS 0)
"""

from __future__ import annotations

from dataclasses import dataclass

_FORBIDDEN = ("/", "#", "+", "\x00")


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    line_id: str
    node_id: str

    def __post_init__(self) -> None:
        for name in ("line_id", "node_id"):
            value = getattr(self, name)
            if not value or any(ch in value for ch in _FORBIDDEN):
                raise ValueError(f"{name} {value!r}: must be non-empty, without '/', '#', '+'")
        if not self.prefix or "#" in self.prefix or "+" in self.prefix:
            raise ValueError(f"topic prefix {self.prefix!r}: must be non-empty, no wildcards")

    @property
    def root(self) -> str:
        return f"{self.prefix.rstrip('/')}/{self.line_id}/{self.node_id}"

    @property
    def induct(self) -> str:
        return f"{self.root}/induct"

    @property
    def feedback(self) -> str:
        return f"{self.root}/feedback"

    @property
    def verdict(self) -> str:
        return f"{self.root}/verdict"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def shadow(self) -> str:
        return f"{self.root}/shadow"

    @property
    def inputs(self) -> tuple[str, str]:
        """The topics the node subscribes to."""
        return (self.induct, self.feedback)
