"""The shadow record: what a candidate model set did in shadow on this device.

The shadow scorer (edge/pipeline) rewrites it as items are scored; the update gate
(edge/update) reads it to decide whether a models bundle with that candidate may be
promoted. Keyed by the candidate manifest's sha256, so a record never vouches for
another candidate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edge.durable import write_atomic

#: Where the record lives under `storage.state_dir`.
SHADOW_RECORD_FILE = Path("shadow") / "record.json"


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    candidate_version: str  # the candidate manifest's `version`
    candidate_sha256: str  # sha256 of the candidate manifest file
    items_scored: int  # items the candidate scored in shadow
    items_skipped: int  # items it did not try: its queue full, the node behind, shutdown
    agreements: int  # items where candidate and production made the same decision
    sidelined_candidate: int  # scored items the candidate sidelined
    sidelined_production: int  # scored items production sidelined
    updated_ms: float  # wall clock of the last update
    # Last, with a default: records written before it was kept still load.
    items_failed: int = 0  # items on which the candidate's models raised (not scored)

    @property
    def failed_share(self) -> float:
        """Of the items the candidate tried (scored or failed), the share it failed on."""
        tried = self.items_scored + self.items_failed
        return self.items_failed / tried if tried else 0.0

    @property
    def agreement(self) -> float:
        return self.agreements / self.items_scored if self.items_scored else 0.0

    @property
    def sideline_rate_candidate(self) -> float:
        return self.sidelined_candidate / self.items_scored if self.items_scored else 0.0

    @property
    def sideline_rate_production(self) -> float:
        return self.sidelined_production / self.items_scored if self.items_scored else 0.0


def write_shadow_record(path: Path, record: ShadowRecord) -> None:
    """Durably replace the record (it must survive a power cut between shadow and update)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(record), indent=2) + "\n")


def load_shadow_record(path: Path) -> ShadowRecord | None:
    """The record, or None when there is none or it cannot be read."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ShadowRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None
