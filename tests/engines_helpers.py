"""A copy of the shipped engines whose golden set no longer matches the models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

from edge.infer.manifest import sha256_file

REPO = Path(__file__).resolve().parent.parent


def engines_that_miss_their_golden_scores(folder: Path) -> Path:
    """The shipped engines copied to `folder`, the golden set expecting other damage scores
    (its checksum updated to match); returns the copy's manifest."""
    engines = folder / "engines"
    shutil.copytree(REPO / "engines", engines)
    golden = engines / "golden" / "golden.npz"
    with np.load(golden, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["expected_damage"] = np.clip(arrays["expected_damage"] + 0.3, 0.0, 1.0)
    np.savez(golden, **arrays)
    manifest = engines / "manifest.yaml"
    text = manifest.read_text()
    old_sha = yaml.safe_load(text)["golden"]["sha256"]
    manifest.write_text(text.replace(old_sha, sha256_file(golden)))
    return manifest
