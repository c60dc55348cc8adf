"""Fixtures for the model tests: the shipped models, copies of `engines/` to break, golden items.

* ``inspector``: the shipped models on ONNX Runtime (CPU) with an in-memory
  gallery seeded from the shipped reference views (session-scoped: loading
  takes a second).
* ``engines_copy``: a private copy of `engines/` (manifest + models) that a
  test may corrupt; ``models_cfg`` points a `ModelsConfig` at it.
* ``golden``: the shipped golden set (known items with labels).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge.commands.models import memory_inspector
from edge.config import DEFAULT_MANIFEST, ModelsConfig
from edge.infer.golden import GoldenSet, load_golden
from edge.infer.inspector import ItemInspector

ENGINES = DEFAULT_MANIFEST.parent


@pytest.fixture(scope="session")
def inspector() -> ItemInspector:
    return memory_inspector(ModelsConfig(manifest=DEFAULT_MANIFEST, max_batch=8), None)


@pytest.fixture(scope="session")
def golden() -> GoldenSet:
    return load_golden(ENGINES / "golden" / "golden.npz")


@pytest.fixture
def engines_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "engines"
    shutil.copytree(ENGINES, dest, ignore=shutil.ignore_patterns("*.pt", "MODEL_CARD.md"))
    return dest


@pytest.fixture
def models_cfg(engines_copy: Path, tmp_path: Path) -> ModelsConfig:
    return ModelsConfig(manifest=engines_copy / "manifest.yaml", gallery_dir=tmp_path / "gallery",
                        engine_cache=tmp_path / "plans", max_batch=4)


@pytest.fixture(scope="session")
def other_embedding_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid model update whose embedding computes other features of the same shape
    (read-only: copy it before changing anything)."""
    from tests.engines_helpers import engines_with_another_embedding

    return engines_with_another_embedding(tmp_path_factory.mktemp("other-embedding"))
