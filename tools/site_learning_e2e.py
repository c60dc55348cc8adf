#!/usr/bin/env python3
"""Site learning end to end: a site the shipped models partly miss, learned from its own labels.

    python tools/site_learning_e2e.py [--history 2400] [--fresh 1200] [--synthetic 600]
                                      [--work DIR] [--json OUT]

1. **The site.** A synthetic line of the node's own catalogue whose damage is all subtle
   (`synthetic.severity_mix` 1/0/0: shallow dents, pinholes, short tears, small stains)
   under the line's lighting, shadows, dirt and blur (`synthetic.nuisance` 1), 30 % damaged.
   Items are rendered and cut out by the node's own code (`edge.sim.dataset.write_dataset`).
2. **The node with the shipped models** judges the site's history (the inspector and the
   verdict policy the node runs). The real snapshot store keeps every sidelined item and
   every pass (a site collecting labels samples all passes for a while); simulated
   inspectors give the feedback controllers would: `confirmed_damage` for damage among the
   sidelined and among the passes (misses found in the audit), `false_positive` for good
   items sidelined; a pass nobody contradicts is an intact label.
3. `edge-node snapshots export`, then `edge-node train` (a candidate folder).
4. **Shadow.** A fresh run of the same line (the items after the history): the node's
   verdicts with the shipped models, and the real shadow scorer
   (`edge.pipeline.shadow.ShadowScorer`) scoring the candidate beside them, which writes the
   shadow record.
5. **Promotion.** `tools/make_bundle.py build --kind models` packs the candidate; `edge-node
   update apply` installs it on a release store holding the shipped models, with the shadow
   gate on (`update.shadow_gate`): refused before the shadow record exists, committed after;
   the installed release must decide as the candidate folder did.
6. **The check**, on the fresh run with ground truth. The candidate's false-positive rate
   must stay within the target: no more false positives than models that keep to it show in
   95 % of runs this size (a one-sided binomial bound). The target is the thresholds'
   `target_fpr`, or 1/(n+1) when the n good held-out items its thresholds were fitted on
   cannot resolve less (a small run). Its recall must exceed by `--min-gain` the shipped
   models' recall within that same false-positive rate (at their own thresholds when those
   keep to it; else at the best threshold for them on this very run).

Prints one JSON document (and writes it with `--json`); writes the figures into the
candidate's model card. Exit 0 when the check passes, 1 otherwise. Outside CI
(`tools/long_checks.sh`); tests/training/test_site_learning.py runs it small.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.audit.shadow_record import SHADOW_RECORD_FILE, load_shadow_record  # noqa: E402
from edge.audit.store import SnapshotStore  # noqa: E402
from edge.catalogue import load_catalogue  # noqa: E402
from edge.clock import WallClock  # noqa: E402
from edge.commands.main import main as edge_node  # noqa: E402
from edge.config import (  # noqa: E402
    DEFAULT_MANIFEST,
    Config,
    DecisionConfig,
    ModelsConfig,
    StorageConfig,
    load_config,
)
from edge.infer.dataset import load_dataset  # noqa: E402
from edge.infer.fit import roc_auc  # noqa: E402
from edge.infer.gallery import ReferenceGallery  # noqa: E402
from edge.infer.inspector import DAMAGE, EMBEDDING, ItemInspector, embedding_identity  # noqa: E402
from edge.infer.manifest import load_manifest  # noqa: E402
from edge.infer.runtimes import open_backend  # noqa: E402
from edge.logs import configure_logging  # noqa: E402
from edge.pipeline.shadow import ShadowScorer  # noqa: E402
from edge.sim.dataset import DatasetSpec, write_dataset  # noqa: E402
from edge.training.site_card import CARD, set_card_section  # noqa: E402
from edge.types import Decision, ItemRecord, Verdict  # noqa: E402
from edge.verdicts.policy import VerdictPolicy  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import make_bundle  # noqa: E402

CARD_SECTION = "Fresh run of the site (tools/site_learning_e2e.py)"


@dataclass(frozen=True, slots=True)
class Site:
    """What sets the site apart from the shipped training data, and how it is audited."""

    severity_mix: tuple[float, float, float] = (1.0, 0.0, 0.0)  # subtle, moderate, severe
    nuisance: float = 1.0
    depth_noise_scale: float = 1.0
    damage_rate: float = 0.3
    confounder_rate: float = 0.05
    pass_sample: float = 1.0  # share of passed items kept as snapshots (and audited)
    camera_size: tuple[int, int] = (640, 480)
    cameras: tuple[str, ...] = ("top", "angled")  # of the node's default rig

    def config(self) -> Config:
        """The node's defaults with the site's cameras (the rest is the dataset's)."""
        cfg = load_config(None)
        syn = dataclasses.replace(cfg.synthetic, depth_noise_scale=self.depth_noise_scale)
        width, height = self.camera_size
        cams = tuple(dataclasses.replace(c, width=width, height=height) for c in cfg.cameras
                     if c.id in self.cameras)
        return dataclasses.replace(cfg, synthetic=syn, cameras=cams)


def render(folder: Path, site: Site, items: int, seed: int) -> list[ItemRecord]:
    """`items` items of the site, cut out by the node's own code (with ground truth)."""
    spec = DatasetSpec(items=items, seed=seed, damage_rate=site.damage_rate,
                       confounder_rate=site.confounder_rate, references=0,
                       severity_mix=site.severity_mix, nuisance=site.nuisance)
    # Worker processes take seconds to start: worth it for a large run only.
    workers = 2 if items >= 500 else 1
    write_dataset(folder, site.config(), load_catalogue(), spec, workers=workers)
    return list(load_dataset(folder).items)


def inspector(manifest: Path, threads: int = 1) -> ItemInspector:
    """The models of `manifest` as a freshly installed node has them: the gallery seeded
    from the shipped reference views."""
    cfg = ModelsConfig(manifest=manifest, intra_op_threads=threads)
    spec = load_manifest(manifest)
    insp = ItemInspector(spec, open_backend(spec.model(EMBEDDING), cfg),
                         open_backend(spec.model(DAMAGE), cfg),
                         gallery=ReferenceGallery(None, model=embedding_identity(spec)),
                         catalogue=load_catalogue(), cfg=cfg)
    insp.seed_gallery(persist=False)
    return insp


def judge(insp: ItemInspector, records: Sequence[ItemRecord]) -> list[Verdict]:
    """The node's verdicts: the models, then the verdict policy."""
    policy = VerdictPolicy.from_manifest(insp.manifest, DecisionConfig())
    now = time.time() * 1000.0
    return [policy.decide(r, res, now) for r, res in zip(records, insp.infer(records),
                                                        strict=True)]


def feedback_for(record: ItemRecord, verdict: Verdict) -> str | None:
    """What the site's inspectors report about a kept item: every sidelined one, and the
    damage they find among the sampled passes."""
    damaged = record.truth is not None and record.truth.damage is not None
    if verdict.decision is Decision.SIDELINE:
        return "confirmed_damage" if damaged else "false_positive"
    return "confirmed_damage" if damaged else None


def keep_and_label(store_dir: Path, records: Sequence[ItemRecord], verdicts: Sequence[Verdict],
                   pass_sample: float) -> dict[str, int]:
    """The node's snapshot store keeps what it keeps; then the controller's feedback."""
    cfg = StorageConfig(state_dir=store_dir.parent, snapshot_pass_sample=pass_sample,
                        snapshots_min_free_mb=0.0, snapshots_max_mb=1e6)
    store = SnapshotStore(store_dir, cfg, queue_size=2 * len(records) + 1)  # items and labels
    store.start()
    counts = {"kept": 0, "labelled": 0}
    try:
        kept = [(r, store.offer(r, v)) for r, v in zip(records, verdicts, strict=True)]
        for record, verdict in kept:
            if verdict.snapshot_id is None:
                continue
            counts["kept"] += 1
            kind = feedback_for(record, verdict)
            if kind is not None and store.label(record.item_id, kind):
                counts["labelled"] += 1
    finally:
        store.close(timeout_s=600.0)
    return counts


@dataclass(frozen=True, slots=True)
class Ran:
    """What a command said and how it ended."""

    code: int
    out: str
    err: str


def command(tool: Callable[[list[str]], int], args: Sequence[str | Path], *,
            check: bool = True) -> Ran:
    """Run a command line's `main` as an operator would run the command (in this process:
    the same code, without a Python start per step); `check`: fail with what it said."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool([str(a) for a in args])
    if check and code != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} … exited {code}: "
                           f"{err.getvalue().strip()[-2000:]}")
    return Ran(code, out.getvalue(), err.getvalue())


def shadow_run(record_path: Path, candidate: Path, production: ItemInspector,
               records: Sequence[ItemRecord], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """The node's shadow scorer on the fresh run: the candidate judges every item production
    judged, and keeps the record the update gate reads."""
    scorer = ShadowScorer(candidate, production, DecisionConfig(), WallClock(),
                          record_path=record_path, max_queue=len(records) + 1,
                          max_batch=production.cfg.max_batch, node_id="e2e", line_id="site")
    if scorer.reload() is not None:
        raise RuntimeError(f"the shadow scorer refused the candidate {candidate}")
    scorer.start()
    for record, verdict in zip(records, verdicts, strict=True):
        scorer.offer(record, verdict)
    deadline = time.monotonic() + 600.0
    while time.monotonic() < deadline:
        rec = load_shadow_record(record_path)
        if rec is not None and rec.items_scored + rec.items_skipped >= len(records):
            break
        time.sleep(0.2)
    scorer.stop()
    rec = load_shadow_record(record_path)
    if rec is None:
        raise RuntimeError(f"the shadow scorer wrote no record at {record_path}")
    return {"items_scored": rec.items_scored, "items_skipped": rec.items_skipped,
            "agreement": rec.agreement, "sideline_rate_production": rec.sideline_rate_production,
            "sideline_rate_candidate": rec.sideline_rate_candidate,
            "candidate_sha256": rec.candidate_sha256}


def figures(records: Sequence[ItemRecord], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Recall (all damage, and by severity), false-positive rate, AUROC, sideline rate."""
    side = np.array([v.decision is Decision.SIDELINE for v in verdicts])
    truth = [r.truth for r in records]
    damaged = np.array([t is not None and t.damage is not None for t in truth])
    fused = np.array([np.nan if v.scores is None else v.scores.fused for v in verdicts])
    out: dict[str, Any] = {
        "items": len(records), "damaged": int(damaged.sum()),
        "recall": float(side[damaged].mean()) if damaged.any() else float("nan"),
        "false_positive_rate": float(side[~damaged].mean()) if (~damaged).any() else 0.0,
        "false_positives": int((side & ~damaged).sum()),
        "sideline_rate": float(side.mean()),
        "auroc": roc_auc(np.nan_to_num(fused, nan=1.0), damaged)}
    by: dict[str, list[bool]] = {}
    for t, s in zip(truth, side, strict=True):
        if t is not None and t.damage is not None:
            by.setdefault(str(t.severity), []).append(bool(s))
    out["recall_by_severity"] = {k: float(np.mean(v)) for k, v in sorted(by.items())}
    out["_fused"], out["_damaged"] = fused, damaged
    return out


def fpr_bound(target: float, intact: int, confidence: float = 0.95) -> float:
    """The highest false-positive rate a run with `intact` good items can show while the
    models keep to `target`: the `confidence` quantile of the binomial count, as a rate."""
    total, k = 0.0, 0
    while k < intact:
        total += math.comb(intact, k) * target**k * (1.0 - target) ** (intact - k)
        if total >= confidence:
            break
        k += 1
    return k / max(intact, 1)


def recall_within(fig: dict[str, Any], bound: float) -> float:
    """The models' recall with at most `bound` of the good items sidelined: at their own
    thresholds when those keep to it, else at the threshold that would have (chosen on this
    very run: the best those models could have done here)."""
    if fig["false_positive_rate"] <= bound:
        return float(fig["recall"])
    fused, damaged = np.nan_to_num(fig["_fused"], nan=1.0), fig["_damaged"]
    good = np.sort(fused[~damaged])[::-1]
    allowed = int(np.floor(bound * good.size))
    threshold = np.nextafter(good[allowed], np.inf) if allowed < good.size else -np.inf
    return float((fused[damaged] >= threshold).mean())


def release_store(root: Path, work: Path, key: Path, manifest: Path) -> None:
    """A device whose current release runs the shipped models' manifest (installed offline;
    the candidate's bundle carries every model file, so the manifest is what matters here:
    the shadow gate compares it)."""
    stage = work / "full-stage"
    (stage / "engines").mkdir(parents=True)
    shutil.copy2(manifest, stage / "engines" / manifest.name)
    (stage / "config").mkdir()
    (stage / "config" / "default.yaml").write_text("node: {node_id: e2e}\n", encoding="utf-8")
    bundle = work / "cv-base.cvb"
    command(make_bundle.main, ["build", "--version", "1.0.0", "--key", key, "--out", bundle,
                               stage])
    command(edge_node, ["update", "apply", "--root", root, "--public-key",
                        key.with_suffix(".pub"), "--no-restart", bundle])


def promote(work: Path, candidate: Path, state: Path, manifest: Path,
            gate: dict[str, float]) -> dict[str, Any]:
    """Bundle the candidate and apply it with the shadow gate on: refused without a shadow
    record, committed with the one the shadow run wrote (in `state`)."""
    key = work / "signing.pem"
    command(make_bundle.main, ["keygen", "--private", key, "--public", key.with_suffix(".pub")])
    root = work / "device"
    release_store(root, work, key, manifest)
    bundle = work / "cv-candidate.cvb"
    built = command(make_bundle.main, ["build", "--kind", "models", "--base-version", "1.0.0",
                                       "--version", "1.0.0+m1", "--key", key, "--out", bundle,
                                       candidate])
    config = work / "device.yaml"
    apply: list[str | Path] = ["update", "apply", "--root", root, "--public-key",
                               key.with_suffix(".pub"), "--no-restart", "--config", config,
                               bundle]
    out: dict[str, Any] = {"bundle": built.out.strip().splitlines()}
    for name, where in (("without_record", work / "no-shadow"), ("with_record", state)):
        config.write_text(json.dumps({"storage": {"state_dir": str(where)}, "update": {
            "shadow_gate": {"enabled": True, **gate}}}), encoding="utf-8")
        done = command(edge_node, apply, check=False)
        out[name] = {"exit": done.code,
                     "said": (done.out + done.err).strip().splitlines()[-1:]}
    out["installed_manifest"] = str(root / "current" / "engines" / manifest.name)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--history", type=int, default=2400, help="items the site judged before")
    ap.add_argument("--fresh", type=int, default=1200, help="items of the fresh run")
    ap.add_argument("--synthetic", type=int, default=600, help="`edge-node train --synthetic`")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="`edge-node train --threads`")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--min-gain", type=float, default=0.05,
                    help="recall on the site's damage must rise by at least this much")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--work", type=Path, default=None, help="keep everything in this folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-card", action="store_true",
                    help="leave the candidate's model card as `edge-node train` wrote it")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, site: Site, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    line = render(work / "line", site, args.history + args.fresh, args.seed)
    history, fresh = line[:args.history], line[args.history:]  # the fresh run comes after
    lap("render")
    current = inspector(args.manifest)
    kept = keep_and_label(work / "state" / "snapshots", history, judge(current, history),
                          site.pass_sample)
    export = work / "export"
    exported = json.loads(command(edge_node, [
        "snapshots", "export", "--dir", work / "state" / "snapshots", "--since", "30d",
        "--out", export]).out)
    lap("site_history")
    candidate = work / "candidate"
    trained = json.loads(command(edge_node, [
        "train", "--data", export, "--out", candidate, "--synthetic", str(args.synthetic),
        "--epochs", str(args.epochs), "--threads", str(args.threads),
        "--manifest", args.manifest]).out)
    lap("train")
    fresh_current = judge(current, fresh)
    before = figures(fresh, fresh_current)
    cand = inspector(candidate / args.manifest.name)
    fresh_candidate = judge(cand, fresh)
    after = figures(fresh, fresh_candidate)
    cand.close()
    lap("fresh_run")
    shadow = shadow_run(work / "state" / SHADOW_RECORD_FILE, candidate / args.manifest.name,
                        current, fresh, fresh_current)
    current.close()
    lap("shadow")
    target = float(load_manifest(args.manifest).thresholds.get("target_fpr", 0.005))
    # Thresholds fitted on n good items cannot tell rates below about 1/(n+1) apart: the
    # target such a candidate can be held to.
    resolved = max(target, 1.0 / (trained["held_out"]["intact"] + 1))
    bound = fpr_bound(resolved, after["items"] - after["damaged"])
    before["recall_within_fpr_bound"] = recall_within(before, bound)
    result: dict[str, Any] = {
        "site": dataclasses.asdict(site),
        "sizes": {"history": args.history, "fresh": args.fresh, "synthetic": args.synthetic},
        "snapshots": kept, "export": exported, "train": trained,
        "training_seconds": trained["training_seconds"], "shadow": shadow,
        "before": {k: v for k, v in before.items() if not k.startswith("_")},
        "after": {k: v for k, v in after.items() if not k.startswith("_")},
        "recall_gain": after["recall"] - before["recall_within_fpr_bound"],
        "target_fpr": target, "target_fpr_resolved": resolved, "fpr_bound": bound}
    if not args.no_card:  # before bundling: the bundle carries the card
        card = candidate / load_manifest(candidate / args.manifest.name).model(
            DAMAGE).path.relative_to(candidate).with_name(CARD)
        set_card_section(card, CARD_SECTION, card_text(result))
    # Loose bounds for this site: the candidate is meant to decide otherwise on many items
    # (the damage the shipped models pass, good items they sideline), and may sideline up to
    # the damage rate more than they do, or, as it stops sidelining the good items they
    # sideline, any share less.
    gate = {"min_items": len(fresh), "min_agreement": 0.25,
            "max_sideline_rate_increase": site.damage_rate, "max_sideline_rate_decrease": 1.0}
    promoted = promote(work, candidate, work / "state", args.manifest, gate)
    promoted["installed_decides_as_candidate"] = False
    if promoted["with_record"]["exit"] == 0:
        installed = inspector(Path(promoted["installed_manifest"]))
        promoted["installed_decides_as_candidate"] = [
            v.decision for v in judge(installed, fresh)] == [v.decision for v in fresh_candidate]
        installed.close()
    lap("promote")
    result.update(
        gate=gate, promotion=promoted, timings_s=timings,
        passed=bool(result["recall_gain"] >= args.min_gain
                    and after["false_positive_rate"] <= bound
                    and promoted["without_record"]["exit"] != 0
                    and promoted["with_record"]["exit"] == 0
                    and promoted["installed_decides_as_candidate"]))
    return result


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f}%"


def card_text(result: dict[str, Any]) -> str:
    """The fresh run's figures, for the candidate's model card."""
    site = result["site"]

    def row(name: str, fig: dict[str, Any]) -> str:
        severity = ", ".join(f"{k} {_pct(v)}" for k, v in fig["recall_by_severity"].items())
        return (f"| {name} | {_pct(fig['recall'])} ({severity}) | "
                f"{_pct(fig['false_positive_rate'])} ({fig['false_positives']}) | "
                f"{fig['auroc']:.4f} | {_pct(fig['sideline_rate'])} |")

    before, shadow = result["before"], result["shadow"]
    return f"""A fresh run of the synthetic site the labels came from: {before['items']} items,
{before['damaged']} damaged; severity mix (subtle, moderate, severe) {site['severity_mix']},
nuisance {site['nuisance']}, depth noise x{site['depth_noise_scale']}, judged with ground truth.

| models | recall (by severity) | false-positive rate (items) | AUROC | sideline rate |
|---|---|---|---|---|
{row("current", before)}
{row("candidate", result["after"])}

Held to the false-positive bound of this run ({_pct(result['fpr_bound'])}: target
{_pct(result['target_fpr_resolved'])}), the current models catch at best
{_pct(before['recall_within_fpr_bound'])} of the damage.

The shadow scorer on the same run: agreement {_pct(shadow['agreement'])}, sideline rate
{_pct(shadow['sideline_rate_production'])} (current) and
{_pct(shadow['sideline_rate_candidate'])} (candidate).
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", stream=sys.stderr)
    site = Site()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args, site, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="cv-site-e2e-") as tmp:
            result = run(args, site, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
