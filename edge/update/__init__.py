"""Fleet updates: signed release bundles, an atomic release store, health-gated commit
with automatic rollback, and the `edge-node update` commands."""

from edge.update.bundle import BundleError, Manifest, build_manifest, extract_verified, write_bundle
from edge.update.health import AllOf, GatePolicy, HealthFileProbe, Probe, SystemctlProbe
from edge.update.store import (
    DEFAULT_ROOT,
    ReleaseInfo,
    ReleaseStore,
    UpdateEvent,
    running_release_version,
)
from edge.update.updater import (
    NoServices,
    SystemctlManager,
    UpdateError,
    UpdatePolicy,
    Updater,
)

__all__ = [
    "DEFAULT_ROOT",
    "AllOf",
    "BundleError",
    "GatePolicy",
    "HealthFileProbe",
    "Manifest",
    "NoServices",
    "Probe",
    "ReleaseInfo",
    "ReleaseStore",
    "SystemctlManager",
    "SystemctlProbe",
    "UpdateError",
    "UpdateEvent",
    "UpdatePolicy",
    "Updater",
    "build_manifest",
    "extract_verified",
    "running_release_version",
    "write_bundle",
]
