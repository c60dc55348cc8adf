"""`engines/manifest.yaml`: which model files to run, how to feed them, and the thresholds.

Loading verifies every model file against its recorded sha256 and, once a
backend has opened it, its input and output names, shapes and dtypes. Any
mismatch raises `ManifestError` naming the file and what was expected: the
node refuses to start rather than guess.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge.durable import write_atomic

SCHEMA = 1
#: Symbolic dimension names accepted for the batch axis.
BATCH_DIMS = ("batch", "N", -1)


class ManifestError(RuntimeError):
    """The manifest or a model file it names cannot be used."""

    def __init__(self, where: str, problem: str, expected: str) -> None:
        self.where = where
        self.problem = problem
        self.expected = expected
        super().__init__(f"{where}: {problem}; expected {expected}")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str dimension is dynamic (the batch)
    dtype: str

    def matches(self, shape: Sequence[int | str | None]) -> bool:
        if len(shape) != len(self.shape):
            return False
        for want, got in zip(self.shape, shape, strict=True):
            if isinstance(want, str):
                continue
            if isinstance(got, int) and got != want:
                return False
        return True


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    version: str
    models: Mapping[str, ModelSpec]
    thresholds: Mapping[str, Any]
    fusion: Mapping[str, Any]
    golden: Mapping[str, Any]
    raw: Mapping[str, Any]
    #: sha256 of the manifest file's bytes as loaded (what judged an item, whatever the file
    #: holds later)
    sha256: str = ""

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ManifestError(str(self.path), f"no model named {name!r}",
                                f"one of {sorted(self.models)}") from None

    def model_versions(self) -> dict[str, str]:
        return {name: spec.version for name, spec in self.models.items()}

    @property
    def threshold_version(self) -> str:
        return str(self.thresholds.get("version", "unversioned"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors(raw: object, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(where, f"got {raw!r}", "a list of {name, shape, dtype}")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not {"name", "shape", "dtype"} <= set(t):
            raise ManifestError(f"{where}[{i}]", f"got {t!r}", "a mapping with name, shape, dtype")
        shape = tuple(d if isinstance(d, int) else str(d) for d in t["shape"])
        out.append(TensorSpec(str(t["name"]), shape, str(t["dtype"])))
    return tuple(out)


def _model(name: str, raw: object, base: Path, manifest_path: Path) -> ModelSpec:
    where = f"{manifest_path}: models.{name}"
    if not isinstance(raw, dict):
        raise ManifestError(where, f"got {raw!r}", "a mapping")
    for key in ("version", "file", "sha256", "inputs", "outputs"):
        if key not in raw:
            raise ManifestError(where, f"key {key!r} is missing", "version, file, sha256, "
                                "inputs, outputs")
    return ModelSpec(
        name=name,
        version=str(raw["version"]),
        path=(base / str(raw["file"])).resolve(),
        sha256=str(raw["sha256"]).lower(),
        inputs=_tensors(raw["inputs"], f"{where}.inputs"),
        outputs=_tensors(raw["outputs"], f"{where}.outputs"),
        preprocessing=dict(raw.get("preprocessing") or {}),
    )


def verify_file(spec: ModelSpec) -> None:
    """Check that the model file exists and has the recorded sha256."""
    if not spec.path.is_file():
        raise ManifestError(str(spec.path), f"model file of {spec.name!r} is missing",
                            f"a file with sha256 {spec.sha256}")
    actual = sha256_file(spec.path)
    if actual != spec.sha256:
        raise ManifestError(str(spec.path), f"sha256 is {actual} (corrupt or replaced file)",
                            f"sha256 {spec.sha256} as recorded for {spec.name!r} "
                            f"version {spec.version}")


def verify_io(spec: ModelSpec, inputs: Sequence[tuple[str, Sequence[int | str | None], str]],
              outputs: Sequence[tuple[str, Sequence[int | str | None], str]]) -> None:
    """Compare (name, shape, dtype) the backend reports with the manifest's."""
    for kind, want, got in (("input", spec.inputs, inputs), ("output", spec.outputs, outputs)):
        actual = {name: (tuple(shape), dtype) for name, shape, dtype in got}
        for t in want:
            if t.name not in actual:
                raise ManifestError(str(spec.path), f"has no {kind} named {t.name!r} "
                                    f"(it has {sorted(actual)})",
                                    f"{kind} {t.name} {list(t.shape)} {t.dtype}")
            shape, dtype = actual[t.name]
            if not t.matches(shape) or dtype != t.dtype:
                raise ManifestError(str(spec.path), f"{kind} {t.name!r} is {list(shape)} {dtype}",
                                    f"{list(t.shape)} {t.dtype} as in the manifest")


def load_manifest(path: Path, *, verify: bool = True) -> Manifest:
    """Parse the manifest; with `verify`, check every model file's sha256."""
    try:
        raw_bytes = path.read_bytes()
        data = yaml.safe_load(raw_bytes.decode("utf-8"))
    except FileNotFoundError:
        raise ManifestError(str(path), "the manifest is missing", "engines/manifest.yaml") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(str(path), f"cannot be read ({exc})", "a YAML manifest") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ManifestError(str(path), f"schema is {schema!r}",
                            f"a mapping with schema: {SCHEMA}")
    raw_models = data.get("models")
    if not isinstance(raw_models, dict) or not raw_models:
        raise ManifestError(str(path), "no models", "a 'models' mapping")
    base = path.resolve().parent
    models = {name: _model(str(name), raw, base, path) for name, raw in raw_models.items()}
    if verify:
        for spec in models.values():
            verify_file(spec)
    return Manifest(path=path.resolve(), version=str(data.get("version", "0")), models=models,
                    thresholds=dict(data.get("thresholds") or {}),
                    fusion=dict(data.get("fusion") or {}), golden=dict(data.get("golden") or {}),
                    raw=data, sha256=hashlib.sha256(raw_bytes).hexdigest())


def write_manifest(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically and durably (edge.durable), keeping key order."""
    write_atomic(path, yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None))
