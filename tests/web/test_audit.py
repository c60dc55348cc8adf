"""Acceptance: a synthetic run with damage leaves snapshots whose heat maps mark the damage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.audit.overlays import hot_area
from tests.web.conftest import LiveNode

#: Damaged items (with damage visible in the anomaly map's view) to judge.
ENOUGH = 6


def _judgeable(live_node: LiveNode) -> list[tuple[Path, dict[str, Any]]]:
    """Sidelined, truly damaged items whose anomaly-map view shows the damage."""
    out = []
    for sid in live_node.store.ids():
        data = live_node.store.sidecar(sid)
        folder = live_node.store.path(sid)
        if data is None or folder is None:
            continue
        v, truth = data["verdict"], data["item"]["truth"]
        cam = v["anomaly_camera"]
        if v["decision"] != "sideline" or truth is None or truth["damage"] is None or not cam:
            continue
        truth_file = data["views"][cam]["truth_damage"]
        if truth_file is None:
            continue
        mask = cv2.imread(str(folder / truth_file), cv2.IMREAD_GRAYSCALE)
        if mask is not None and int((mask > 0).sum()) >= 30:
            out.append((folder, data))
    return out


def test_heat_maps_of_damaged_items_overlap_the_true_damage(live_node: LiveNode) -> None:
    """For most sidelined damaged items the overlay's hot area overlaps the ground-truth
    damage mask of that view (chance level is the hot area's share of the crop)."""
    live_node.wait_for(f"{ENOUGH} damaged items with snapshots",
                       lambda: len(_judgeable(live_node)) >= ENOUGH, 120.0)
    assert live_node.store.flush(10.0)
    overlapping, chance = 0, []
    judged = _judgeable(live_node)
    for folder, data in judged:
        cam = data["verdict"]["anomaly_camera"]
        truth = cv2.imread(str(folder / data["views"][cam]["truth_damage"]),
                           cv2.IMREAD_GRAYSCALE) > 0
        hot = hot_area(np.load(folder / "anomaly_map.npy"), truth.shape[0])
        overlapping += bool((hot & truth).any())
        chance.append(float(hot.mean()))
        assert (folder / data["views"][cam]["overlay"]).stat().st_size > 1000
    share = overlapping / len(judged)
    assert share >= 0.6, (overlapping, len(judged), chance)
