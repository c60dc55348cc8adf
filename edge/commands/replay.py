"""`edge-node replay`: judge stored snapshots again, with the models they were judged with or
with a candidate.

Each snapshot holds its item's crops exactly as the models saw them and the record of what
judged them (`edge.audit.replay`). Replay runs them through the node's own code path, an
`ItemInspector` on ONNX Runtime's CPU provider and the `VerdictPolicy` of the manifest, with
the decision settings the node had, and compares every stored score, the decision, the
reasons and the findings:

* a snapshot judged with this very manifest (same sha256) on ONNX Runtime CPU must come out
  the same, bit for bit; one that does not is a difference (exit 1), unless a known cause
  explains it: then it is "not comparable", with the cause, and does not set exit 1;
* a snapshot judged with another manifest (a candidate, or the one before an update) is
  shown old beside new, with a summary of the decisions that changed, by reason.

The gallery is the shipped reference views of the manifest, in memory (what a node with a
fresh gallery scores against), or `--gallery DIR` (a node's `models.gallery_dir`, read and
never written). The known causes all lie in the gallery search, so they explain differences
in the anomaly score and what follows from it (fused score, broken_set, decision, reasons,
findings, map), never in another score:

* the product's bank held another number of views for the node (it learned since, or
  another gallery);
* the node ran with other BLAS threads (the search's sums round by how they are split);
* the node's bank held rows of the other precision: banks read back from the gallery folder
  hold float16 rows, banks embedded since the node started float32 ones. Replay judges such
  an item again against the shipped references at the other precision, and calls it not
  comparable only when that gives back the stored verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.audit.files import SIDECAR, verdict_json
from edge.audit.replay import NotReplayableError, StoredItem, blas_threads, load_stored_item
from edge.audit.store import ID_PATTERN
from edge.commands.log_stream import log_to_stderr
from edge.commands.snapshots import SNAPSHOT_DIR
from edge.config import Config, ConfigError, DecisionConfig, ModelsConfig, load_config
from edge.config_schema import build_section
from edge.infer.backend import BackendError
from edge.infer.gallery import ReferenceGallery
from edge.infer.inspector import ItemInspector
from edge.infer.manifest import ManifestError
from edge.infer.offline import memory_inspector
from edge.types import DamageType, ItemRecord, Verdict
from edge.verdicts.policy import VerdictPolicy

#: What replay compares (the stored verdict's keys; every score field within `scores`).
COMPARED = ("decision", "reasons", "scores", "findings", "threshold_version")
EXIT_OK, EXIT_DIFFERENCES, EXIT_USAGE = 0, 1, 2
#: What the gallery search decides: the anomaly score, and the fused score and broken_set
#: probability computed from it; every other score field is the models' alone.
_GALLERY_SCORES = ("anomaly", "fused")
_GALLERY_TYPES = (DamageType.BROKEN_SET.value,)


def snapshot_dirs(target: str, cfg: Config) -> list[Path]:
    """The snapshot folders `target` names: a snapshot ID in the configured store, a
    snapshot folder, or a folder of snapshots (the store itself, an export)."""
    path = Path(target)
    if path.is_dir():
        if (path / SIDECAR).is_file():
            return [path]
        found = sorted(p for p in path.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and (p / SIDECAR).is_file())
        if not found:
            raise ConfigError("SNAPSHOT", target, "a snapshot folder or a folder of snapshots "
                              f"(none holds a {SIDECAR})")
        return found
    if ID_PATTERN.match(target):
        stored = Path(cfg.storage.state_dir) / SNAPSHOT_DIR / target
        if (stored / SIDECAR).is_file():
            return [stored]
        raise ConfigError("SNAPSHOT", target, f"a snapshot ID stored in {stored.parent} "
                          "(evicted, or another node's: pass --config)")
    raise ConfigError("SNAPSHOT", target, "a snapshot ID (20261123T081502123-ab12-000042), a "
                      "snapshot folder or a folder of snapshots")


def replay_models(cfg: Config, manifest: Path | None) -> ModelsConfig:
    """The config's models on ONNX Runtime's CPU provider, with `manifest` if given."""
    path = manifest or cfg.models.manifest
    if not path.is_file():
        raise ConfigError("--manifest", str(path), "an existing manifest file")
    return dataclasses.replace(cfg.models, manifest=path, backend="onnxruntime",
                               onnx_providers=(), dla_core=None)


@dataclass(slots=True)
class Replayed:
    """One snapshot judged again."""

    item: StoredItem
    replayed: Mapping[str, Any]  # `verdict_json` of the new verdict
    own_manifest: bool  # judged with this manifest before, on ONNX Runtime CPU
    differs: list[str]
    notes: list[str] = field(default_factory=list)
    #: why an own-manifest item that differs cannot be compared bit for bit (None: it can)
    not_comparable: str | None = None

    @property
    def differing(self) -> bool:
        """A difference replay cannot explain: exit status 1."""
        return self.own_manifest and bool(self.differs) and self.not_comparable is None

    @property
    def decision_change(self) -> str | None:
        old, new = self.item.verdict["decision"], self.replayed["decision"]
        return None if old == new else f"{old}->{new}"

    def as_dict(self) -> dict[str, Any]:
        def part(v: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v.get(k) for k in (*COMPARED, "model_versions")}

        return {"snapshot_id": self.item.snapshot_id, "path": str(self.item.path),
                "item_id": self.item.verdict["item_id"],
                "product_id": self.item.verdict["product_id"],
                "mode": "reproduce" if self.own_manifest else "compare",
                "stored": part(self.item.verdict), "replayed": part(self.replayed),
                "same": not self.differs, "differs": self.differs,
                "not_comparable": self.not_comparable,
                "decision_change": self.decision_change, "notes": self.notes}


class Replayer:
    """The node's inspector and policies over stored items (one policy per decision
    setting the items were judged with)."""

    def __init__(self, models: ModelsConfig, gallery_dir: Path | None) -> None:
        self.models = models
        self.gallery_dir = gallery_dir
        self.inspector: ItemInspector = memory_inspector(models, gallery_dir)
        self.sha256 = self.inspector.manifest.sha256
        self._policies: dict[str, VerdictPolicy] = {}
        self._other: ItemInspector | None = None  # the other precision's gallery, when needed

    def policy(self, item: StoredItem) -> VerdictPolicy:
        settings = item.replay.get("decision") or {}
        key = json.dumps(settings, sort_keys=True)
        if key not in self._policies:
            decision = build_section(DecisionConfig, settings, "decision")
            self._policies[key] = VerdictPolicy.from_manifest(self.inspector.manifest, decision)
        return self._policies[key]

    def run(self, items: Sequence[StoredItem]) -> list[Replayed]:
        """Judge `items` again, in batches as the node would."""
        out: list[Replayed] = []
        step = self.models.max_batch
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            results = self.inspector.infer([i.record for i in chunk])
            for item, result in zip(chunk, results, strict=True):
                verdict = self._decide(item, item.record, result)
                replayed = verdict_json(verdict)
                own = item.manifest_sha256 == self.sha256
                causes = self._gallery_causes(item)
                done = Replayed(item, replayed, own and item.scored_on_cpu(),
                                _differences(item, verdict), self._notes(item, own) + causes)
                if done.own_manifest and done.differs:
                    done.not_comparable = self._not_comparable(done, causes)
                out.append(done)
        return out

    def _decide(self, item: StoredItem, record: ItemRecord, result: Any) -> Verdict:
        decided = item.verdict.get("decided_ms")
        return self.policy(item).decide(record, result,
                                        float(decided) if decided is not None else 0.0)

    def _notes(self, item: StoredItem, own_manifest: bool) -> list[str]:
        if own_manifest and not item.scored_on_cpu():
            backend = item.replay.get("backend") or {}
            return [f"scored on {backend.get('name')} {backend.get('providers')}: not "
                    "comparable bit for bit with ONNX Runtime CPU"]
        return []

    def _gallery_causes(self, item: StoredItem) -> list[str]:
        """What makes the gallery search differ from the node's, as far as recorded."""
        causes = []
        if item.replay.get("blas_threads") != blas_threads():
            causes.append(f"the node ran with OPENBLAS_NUM_THREADS="
                          f"{item.replay.get('blas_threads')}, replay with {blas_threads()}: "
                          "the gallery search rounds otherwise")
        gallery = self.inspector.gallery
        pid = item.record.product_id
        recorded = (item.replay.get("gallery") or {}).get("views") or {}
        for cam, views in sorted(recorded.items()):
            now = 0 if pid is None else gallery.views(pid, cam)
            if now != views:
                causes.append(f"gallery: {pid}/{cam} held {views} views for the node, "
                              f"{now} here (learned since, or another gallery: --gallery)")
        return causes

    def _not_comparable(self, done: Replayed, causes: Sequence[str]) -> str | None:
        """Why an own-manifest item that differs is not comparable (None: a difference)."""
        if not _gallery_explains(done.item.verdict, done.replayed):
            return None
        if causes:
            return "; ".join(causes)
        item = done.item
        other = self._other_precision()
        verdict = self._decide(item, item.record, other.infer([item.record])[0])
        if _differences(item, verdict):
            return None
        if self.gallery_dir is None:
            where = (item.replay.get("gallery") or {}).get("dir") or "models.gallery_dir"
            return ("the node's bank held rows read back from its gallery folder (float16): "
                    "against the shipped references read back so it comes out the same; "
                    f"replay with --gallery {where} to compare bit for bit")
        return ("the node's bank held rows embedded in memory (float32): against the shipped "
                "references in memory it comes out the same; replay without --gallery to "
                "compare bit for bit")

    def _other_precision(self) -> ItemInspector:
        """The models with the shipped references at the other precision from replay's own
        gallery: written and read back (float16) when that is in memory, in memory (float32)
        when it is `--gallery`'s. Built once, when first needed."""
        if self._other is None:
            base = self.inspector
            model = base.gallery.model

            def with_gallery(gallery: ReferenceGallery) -> ItemInspector:
                return ItemInspector(base.manifest, base.embedding, base.damage, gallery=gallery,
                                     catalogue=base.catalogue, cfg=base.cfg)

            if self.gallery_dir is None:
                with tempfile.TemporaryDirectory(prefix="cv-replay-") as tmp:
                    with_gallery(ReferenceGallery(Path(tmp), model=model)).seed_gallery()
                    gallery = ReferenceGallery(Path(tmp), model=model)  # as a node reads it
            else:
                gallery = ReferenceGallery(None, model=model)
                with_gallery(gallery).seed_gallery(persist=False)
            self._other = with_gallery(gallery)
        return self._other


def _differences(item: StoredItem, verdict: Verdict) -> list[str]:
    """The compared parts in which `verdict` is not the stored one."""
    replayed = verdict_json(verdict)
    differs = [k for k in COMPARED if item.verdict.get(k) != replayed.get(k)]
    if not _same_map(item.path, verdict.anomaly_map):
        differs.append("anomaly_map")
    return differs


def _gallery_explains(stored: Mapping[str, Any], replayed: Mapping[str, Any]) -> bool:
    """Whether the scores differ only where the gallery search decides them (the decision,
    reasons, findings and map follow from the scores)."""
    old, new = stored.get("scores") or {}, replayed.get("scores") or {}
    if stored.get("threshold_version") != replayed.get("threshold_version") or (
            set(old) != set(new)):
        return False
    for key in set(old) - set(_GALLERY_SCORES):
        a, b = old[key], new[key]
        if key == "per_type" and isinstance(a, Mapping) and isinstance(b, Mapping):
            a = {k: v for k, v in a.items() if k not in _GALLERY_TYPES}
            b = {k: v for k, v in b.items() if k not in _GALLERY_TYPES}
        if a != b:
            return False
    return True


def _same_map(snapshot_dir: Path, amap: np.ndarray | None) -> bool:
    stored = snapshot_dir / "anomaly_map.npy"
    if not stored.is_file():
        return amap is None
    return amap is not None and bool(np.array_equal(np.load(stored), amap, equal_nan=True))


def summarize(results: Iterable[Replayed], skipped: Sequence[tuple[Path, str]],
              replayer: Replayer, gallery: str) -> dict[str, Any]:
    """Counts for the summary; `exit` is the command's exit status."""
    results = list(results)
    own = [r for r in results if r.own_manifest]
    other = [r for r in results if not r.own_manifest]
    changed: dict[str, dict[str, int]] = {}
    for r in results:
        change = r.decision_change
        if change is None:
            continue
        sidelining = r.replayed if r.replayed["decision"] == "sideline" else r.item.verdict
        by_reason = changed.setdefault(change, {})
        for reason in sidelining["reasons"] or ["(none)"]:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    differing = sum(1 for r in own if r.differing)
    not_comparable = sum(1 for r in own if r.not_comparable is not None)
    manifest = replayer.inspector.manifest
    return {
        "manifest": {"path": str(manifest.path), "version": manifest.version,
                     "sha256": replayer.sha256, "threshold_version": manifest.threshold_version},
        "gallery": gallery,
        "snapshots": len(results) + len(skipped),
        "replayed": len(results),
        "not_replayable": [{"snapshot": p.name, "why": why} for p, why in skipped],
        "same_manifest": {"items": len(own),
                          "reproduced": len(own) - differing - not_comparable,
                          "differing": differing, "not_comparable": not_comparable},
        "other_manifest": {"items": len(other),
                           "decisions_changed": sum(1 for r in other if r.decision_change)},
        "decisions_changed": {k: dict(sorted(v.items())) for k, v in sorted(changed.items())},
        "exit": EXIT_DIFFERENCES if differing else EXIT_OK,
    }


def _line(r: Replayed) -> str:
    def said(v: Mapping[str, Any]) -> str:
        fused = (v.get("scores") or {}).get("fused")
        shown = "  -   " if fused is None else f"{fused:.4f}"
        return f"{v['decision'].upper():<8} {shown} {','.join(v['reasons']) or '-':<18}"

    if not r.own_manifest:
        status = "decision changed" if r.decision_change else "decision kept"
    elif not r.differs:
        status = "same"
    else:
        status = ("not comparable" if r.not_comparable is not None else "DIFFERS") + (
            ": " + ", ".join(r.differs))
    line = (f"{r.item.snapshot_id}  {r.item.verdict['item_id']:<20} stored {said(r.item.verdict)}"
            f"| replay {said(r.replayed)} {status}")
    notes = r.notes if r.not_comparable is None else [f"not comparable: {r.not_comparable}"]
    return "\n".join([line, *(f"    note: {n}" for n in notes)])


def _print(results: Sequence[Replayed], summary: Mapping[str, Any]) -> None:
    m = summary["manifest"]
    out = sys.stdout
    out.write(f"replay with {m['path']} (version {m['version']}, thresholds "
              f"{m['threshold_version']}, sha256 {m['sha256'][:12]}), gallery "
              f"{summary['gallery']}\n")
    for r in results:
        out.write(_line(r) + "\n")
    for entry in summary["not_replayable"]:
        out.write(f"{entry['snapshot']}  not replayed: {entry['why']}\n")
    same, other = summary["same_manifest"], summary["other_manifest"]
    out.write(f"same manifest: {same['items']} items, {same['reproduced']} reproduced, "
              f"{same['differing']} differing, {same['not_comparable']} not comparable\n")
    out.write(f"other manifest: {other['items']} items, {other['decisions_changed']} "
              "decisions changed\n")
    for change, reasons in summary["decisions_changed"].items():
        listed = ", ".join(f"{k} {n}" for k, n in reasons.items())
        out.write(f"  {change}: {sum(reasons.values())} ({listed})\n")


def _replay(args: argparse.Namespace) -> int:
    log_to_stderr("warning")
    cfg = load_config(args.config)
    if args.gallery is not None and not args.gallery.is_dir():
        raise ConfigError("--gallery", str(args.gallery), "a gallery folder")
    dirs = snapshot_dirs(args.snapshot, cfg)
    items: list[StoredItem] = []
    skipped: list[tuple[Path, str]] = []
    for d in dirs:
        try:
            items.append(load_stored_item(d))
        except NotReplayableError as exc:
            skipped.append((d, str(exc)))
    if not items:
        why = "; ".join(f"{p.name}: {w}" for p, w in skipped[:3])
        raise ConfigError("SNAPSHOT", args.snapshot, f"snapshots that can be replayed ({why})")
    try:
        replayer = Replayer(replay_models(cfg, args.manifest), args.gallery)
    except (ManifestError, BackendError) as exc:
        raise ConfigError("--manifest", str(args.manifest or cfg.models.manifest),
                          f"a manifest whose models load ({exc})") from None
    replayable: list[StoredItem] = []
    for item in items:
        try:
            replayer.policy(item)
            replayable.append(item)
        except ConfigError as exc:  # settings of a newer release
            skipped.append((item.path, f"its decision settings cannot be used here ({exc})"))
    results = replayer.run(replayable)
    summary = summarize(results, skipped, replayer, str(args.gallery or "shipped"))
    if args.json:
        sys.stdout.write(json.dumps({"items": [r.as_dict() for r in results],
                                     "summary": summary}) + "\n")
    else:
        _print(results, summary)
    return int(summary["exit"])


def add_replay_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = sub.add_parser(
        "replay", help="judge stored snapshots again (same models: must match; a candidate: "
        "old beside new)",
        description="Exit status: 0 done; 1 a snapshot judged with this manifest on ONNX "
        "Runtime CPU came out different, and no known cause (the gallery's views, precision "
        "or BLAS threads) explains it; 2 usage or configuration error.")
    replay.add_argument("snapshot", metavar="SNAPSHOT_ID|DIR",
                        help="a snapshot ID in the configured store, a snapshot folder, or a "
                        "folder of snapshots (the store, an export)")
    replay.add_argument("--manifest", type=Path, default=None,
                        help="the models to judge with (default: the config's models.manifest)")
    replay.add_argument("--config", type=Path, default=None,
                        help="node config YAML: snapshot store, models settings (default: "
                        "the embedded defaults)")
    replay.add_argument("--gallery", type=Path, default=None,
                        help="a reference gallery folder to score against, read only (default: "
                        "the manifest's shipped references)")
    replay.add_argument("--json", action="store_true", help="one JSON document")
    replay.set_defaults(handler=_replay)
