"""Candidate model sets for the replay and shadow tests: the shipped models under a manifest of
their own, with other thresholds (a candidate that disagrees) or a model file that does not
match its checksum (a broken one)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"


def candidate_manifest(folder: Path, *, fused_scale: float, tag: str = "cand") -> Path:
    """The shipped models (linked) with every fused threshold times `fused_scale`: below 1,
    a candidate that sidelines items production passes."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in ENGINES.iterdir():
        if entry.name != "manifest.yaml":
            (folder / entry.name).symlink_to(entry)
    raw = yaml.safe_load((ENGINES / "manifest.yaml").read_text())
    raw["version"] = f"{raw['version']}-{tag}"
    thresholds = raw["thresholds"]
    thresholds["version"] = f"{tag}-{thresholds['version']}"
    thresholds["fused"] = {k: float(v) * fused_scale for k, v in thresholds["fused"].items()}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def broken_manifest(folder: Path) -> Path:
    """A candidate whose damage model does not match the sha256 its manifest records."""
    path = candidate_manifest(folder, fused_scale=1.0, tag="broken")
    raw = yaml.safe_load(path.read_text())
    raw["models"]["damage"]["sha256"] = "0" * 64
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
