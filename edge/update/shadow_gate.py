"""The shadow gate: a bundle that changes the models must have run in shadow on this device.

The node's shadow scorer (`edge.pipeline.shadow`) scores a candidate model set beside the
production models and keeps a `ShadowRecord` under `storage.state_dir`, keyed by the sha256
of the candidate's manifest. With `update.shadow_gate.enabled`, the updater refuses a bundle
whose `engines/manifest.yaml` differs from the running release's unless that record is for
exactly that manifest and shows:

- at least `min_items` items scored;
- the same decision as production on at least `min_agreement` of them;
- a sideline rate at most `max_sideline_rate_increase` above production's and at most
  `max_sideline_rate_decrease` below it (a candidate that passes nearly everything agrees
  with production on nearly every item of a line that is nearly all good);
- failures (its models raised) on at most `max_failed_share` of the items it tried.

A refusal goes the updater's refusal path (journal, `update-status.json`, exit 1) with the
reason. Bundles that leave the manifest as it is (software only) are not gated.

The record counts decisions only: it holds no controller labels, so which side of a
disagreement was right is not gated on here (`edge-node shadow report` shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from edge.audit.shadow_record import SHADOW_RECORD_FILE, ShadowRecord, load_shadow_record
from edge.config import ShadowGateConfig
from edge.infer.manifest import sha256_file
from edge.update.bundle import BundleError

log = structlog.get_logger(__name__)

#: Where a release keeps its models' manifest.
MANIFEST_IN_RELEASE = Path("engines") / "manifest.yaml"


class ShadowGateError(BundleError):
    """The bundle's models have no shadow record that vouches for them; says why (refused
    like any bundle that must not be installed)."""


@dataclass(frozen=True, slots=True)
class ShadowGate:
    record_path: Path
    min_items: int
    min_agreement: float
    max_sideline_rate_increase: float
    max_failed_share: float = 0.01
    max_sideline_rate_decrease: float = 0.01

    @staticmethod
    def from_config(cfg: ShadowGateConfig, state_dir: Path) -> ShadowGate | None:
        """The gate `update.shadow_gate` sets (None: off), reading the record the node keeps
        under `state_dir`."""
        if not cfg.enabled:
            return None
        return ShadowGate(Path(state_dir) / SHADOW_RECORD_FILE, cfg.min_items,
                          cfg.min_agreement, cfg.max_sideline_rate_increase,
                          cfg.max_failed_share, cfg.max_sideline_rate_decrease)

    def check(self, new_release: Path, current_release: Path | None) -> ShadowRecord | None:
        """Raise ShadowGateError unless the models of `new_release` (an unpacked bundle)
        may replace those of `current_release`; returns the record that vouched for them
        (None: the models do not change, or there is nothing installed to compare with)."""
        manifest = new_release / MANIFEST_IN_RELEASE
        if current_release is None or not manifest.is_file():
            return None
        sha = sha256_file(manifest)
        running = current_release / MANIFEST_IN_RELEASE
        if running.is_file() and sha256_file(running) == sha:
            return None
        record = load_shadow_record(self.record_path)
        why = self._why_not(record, sha)
        fields = {} if record is None else {
            "record_sha256": record.candidate_sha256, "items_scored": record.items_scored,
            "items_failed": record.items_failed,
            "agreement": round(record.agreement, 4),
            "sideline_rate_candidate": round(record.sideline_rate_candidate, 4),
            "sideline_rate_production": round(record.sideline_rate_production, 4)}
        if why is not None:
            log.error("update_shadow_gate_refused", manifest_sha256=sha, reason=why, **fields)
            raise ShadowGateError(f"shadow gate: {why}")
        log.info("update_shadow_gate_passed", manifest_sha256=sha, **fields)
        return record

    def _why_not(self, record: ShadowRecord | None, sha: str) -> str | None:
        if record is None:
            return (f"no shadow record at {self.record_path}: run these models in shadow "
                    f"first (models.shadow.manifest naming a manifest with sha256 {sha[:16]}…)")
        if record.candidate_sha256 != sha:
            return (f"the shadow record is for candidate {record.candidate_version} (manifest "
                    f"sha256 {record.candidate_sha256[:16]}…), not for this bundle's models "
                    f"(sha256 {sha[:16]}…): run these in shadow")
        if record.failed_share > self.max_failed_share:
            return (f"candidate {record.candidate_version} failed on {record.items_failed} of "
                    f"the {record.items_scored + record.items_failed} items it tried in shadow "
                    f"({record.failed_share:.2%}), more than update.shadow_gate."
                    f"max_failed_share {self.max_failed_share:.2%}")
        if record.items_scored < self.min_items:
            return (f"candidate {record.candidate_version} scored {record.items_scored} items "
                    f"in shadow, fewer than the {self.min_items} update.shadow_gate.min_items "
                    "asks")
        if record.agreement < self.min_agreement:
            return (f"candidate {record.candidate_version} agreed with production on "
                    f"{record.agreement:.2%} of {record.items_scored} items, less than "
                    f"update.shadow_gate.min_agreement {self.min_agreement:.2%}")
        rise = record.sideline_rate_candidate - record.sideline_rate_production
        if rise > self.max_sideline_rate_increase:
            return (f"candidate {record.candidate_version} sidelined "
                    f"{record.sideline_rate_candidate:.2%} of the items in shadow against "
                    f"production's {record.sideline_rate_production:.2%}: more than "
                    f"update.shadow_gate.max_sideline_rate_increase "
                    f"{self.max_sideline_rate_increase:.2%} above it")
        if -rise > self.max_sideline_rate_decrease:
            return (f"candidate {record.candidate_version} sidelined "
                    f"{record.sideline_rate_candidate:.2%} of the items in shadow against "
                    f"production's {record.sideline_rate_production:.2%}: more than "
                    f"update.shadow_gate.max_sideline_rate_decrease "
                    f"{self.max_sideline_rate_decrease:.2%} below it")
        return None
