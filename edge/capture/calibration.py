"""The calibration file the node reads: one YAML per camera, keyed by its serial number.

```yaml
format: edge-calibrate/1
"123456789012":                  # camera serial
  intrinsics: {width: 640, height: 480, fx: .., fy: .., cx: .., cy: ..,
               distortion: [k1, k2, p1, p2, k3], source: calibrated}
  depth_scale_m: 0.001
  pose:                          # camera -> belt frame (edge/types.py), mm
    rotation: [[..], [..], [..]]
    translation_mm: [x, y, z]
  inspection_region: {x_min_mm: .., x_max_mm: .., y_min_mm: .., y_max_mm: ..}
  calibrated_at: "2026-11-23T17:00:00+00:00"
  tool_version: "0.1.0"
  quality: {rms_reprojection_px: .., belt_residual_rms_mm: .., fill_rate: ..}
```

`pose` and `inspection_region` are null until `edge-calibrate belt` has run;
quality figures are null when the step that measures them has not run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from edge.config import ConfigError
from edge.durable import write_atomic
from edge.types import Intrinsics, Pose, distortion

FORMAT = "edge-calibrate/1"


class CalibrationError(ConfigError):
    """A calibration file that cannot be used: names the file, the key and the problem."""

    def __init__(self, file: Path | str, key: str, problem: str, value: object = None) -> None:
        super().__init__(key, value, problem)
        self.file = str(file)
        self.key = key or "<root>"
        self.problem = problem
        ValueError.__init__(self, f"calibration file {self.file}: key '{self.key}': {problem}")


def tool_version() -> str:
    try:
        return metadata.version("conveyor-vision")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True, slots=True)
class InspectionRegion:
    """Belt-frame rectangle (mm) the node inspects; its centre is the belt-frame origin."""

    x_min_mm: float
    x_max_mm: float
    y_min_mm: float
    y_max_mm: float

    def contains(self, x: Any, y: Any) -> Any:
        return (x >= self.x_min_mm) & (x <= self.x_max_mm) & (y >= self.y_min_mm) & (
            y <= self.y_max_mm)


@dataclass(frozen=True, slots=True)
class Quality:
    rms_reprojection_px: float | None = None
    belt_residual_rms_mm: float | None = None
    fill_rate: float | None = None


@dataclass(frozen=True, slots=True)
class CameraCalibration:
    """Everything `edge-calibrate` knows about one camera."""

    serial: str
    intrinsics: Intrinsics
    depth_scale_m: float = 0.001
    pose: Pose | None = None
    region: InspectionRegion | None = None
    calibrated_at: str = dataclasses.field(default_factory=utc_now_iso)
    tool_version: str = dataclasses.field(default_factory=tool_version)
    quality: Quality = dataclasses.field(default_factory=Quality)
    intrinsics_source: Literal["calibrated", "factory"] = "calibrated"

    def to_mapping(self) -> dict[str, Any]:
        i = self.intrinsics
        body: dict[str, Any] = {
            "intrinsics": {"width": i.width, "height": i.height, "fx": i.fx, "fy": i.fy,
                           "cx": i.cx, "cy": i.cy, "distortion": [float(c) for c in i.coeffs],
                           "source": self.intrinsics_source},
            "depth_scale_m": float(self.depth_scale_m),
            "pose": None if self.pose is None else {
                "rotation": [[float(v) for v in row] for row in self.pose.rotation],
                "translation_mm": [float(v) for v in self.pose.translation_mm]},
            "inspection_region": None if self.region is None else dataclasses.asdict(self.region),
            "calibrated_at": self.calibrated_at,
            "tool_version": self.tool_version,
            "quality": dataclasses.asdict(self.quality),
        }
        return {"format": FORMAT, self.serial: body}

    def save(self, path: Path | str) -> None:
        """Write the YAML atomically and durably (edge.durable): a reader, even after a power
        cut, finds the old file or the new one, never half a file."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, yaml.safe_dump(self.to_mapping(), sort_keys=False))

    def replace(self, **changes: Any) -> CameraCalibration:
        return dataclasses.replace(self, **changes)


def _number(file: Path, key: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CalibrationError(file, key, "expected a finite number", value)
    if positive and value <= 0:
        raise CalibrationError(file, key, "expected a number > 0", value)
    return float(value)


def _opt_number(file: Path, key: str, value: object) -> float | None:
    return None if value is None else _number(file, key, value)


def _mapping(file: Path, key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CalibrationError(file, key, "expected a mapping", value)
    return value


def _intrinsics(file: Path, key: str, data: object) -> Intrinsics:
    m = _mapping(file, key, data)
    for k in ("width", "height", "fx", "fy", "cx", "cy", "distortion"):
        if k not in m:
            raise CalibrationError(file, f"{key}.{k}", "missing")
    dist = m["distortion"]
    if not isinstance(dist, list) or len(dist) != 5:
        raise CalibrationError(file, f"{key}.distortion", "expected 5 numbers (k1 k2 p1 p2 k3)",
                               dist)
    w, h = m["width"], m["height"]
    for k, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CalibrationError(file, f"{key}.{k}", "expected a positive integer", v)
    coeffs = distortion(_number(file, f"{key}.distortion[{i}]", c) for i, c in enumerate(dist))
    return Intrinsics(w, h, _number(file, f"{key}.fx", m["fx"], positive=True),
                      _number(file, f"{key}.fy", m["fy"], positive=True),
                      _number(file, f"{key}.cx", m["cx"]), _number(file, f"{key}.cy", m["cy"]),
                      coeffs)


def _pose(file: Path, key: str, data: object) -> Pose | None:
    if data is None:
        return None
    m = _mapping(file, key, data)
    try:
        rot = np.array(m["rotation"], dtype=np.float64)
        trans = np.array(m["translation_mm"], dtype=np.float64)
    except KeyError as exc:
        raise CalibrationError(file, f"{key}.{exc.args[0]}", "missing") from None
    except (TypeError, ValueError):
        raise CalibrationError(file, key, "expected rotation 3x3 and translation_mm 3 numbers",
                               data) from None
    if rot.shape != (3, 3) or trans.shape != (3,) or not np.all(np.isfinite(rot)) or not np.all(
            np.isfinite(trans)):
        raise CalibrationError(file, key, "expected rotation 3x3 and translation_mm 3 numbers",
                               data)
    if np.abs(rot @ rot.T - np.eye(3)).max() > 1e-4 or np.linalg.det(rot) < 0:
        raise CalibrationError(file, f"{key}.rotation", "not a rotation (orthonormal, det +1)",
                               m["rotation"])
    return Pose(rot, trans)


def _region(file: Path, key: str, data: object) -> InspectionRegion | None:
    if data is None:
        return None
    m = _mapping(file, key, data)
    vals = {}
    for k in ("x_min_mm", "x_max_mm", "y_min_mm", "y_max_mm"):
        if k not in m:
            raise CalibrationError(file, f"{key}.{k}", "missing")
        vals[k] = _number(file, f"{key}.{k}", m[k])
    if vals["x_min_mm"] >= vals["x_max_mm"] or vals["y_min_mm"] >= vals["y_max_mm"]:
        raise CalibrationError(file, key, "expected x_min < x_max and y_min < y_max", data)
    return InspectionRegion(**vals)


def calibration_from_mapping(file: Path, data: object) -> CameraCalibration:
    top = _mapping(file, "", data)
    if top.get("format") != FORMAT:
        raise CalibrationError(file, "format", f"expected {FORMAT!r} (a file written by "
                               "edge-calibrate)", top.get("format"))
    serials = [k for k in top if k != "format"]
    if len(serials) != 1:
        raise CalibrationError(file, "", "expected exactly one camera serial as a key", serials)
    serial = str(serials[0])
    body = _mapping(file, serial, top[serials[0]])
    if "intrinsics" not in body:
        raise CalibrationError(file, f"{serial}.intrinsics", "missing")
    intr = _intrinsics(file, f"{serial}.intrinsics", body["intrinsics"])
    source = body["intrinsics"].get("source", "calibrated")
    if source not in ("calibrated", "factory"):
        raise CalibrationError(file, f"{serial}.intrinsics.source",
                               "expected 'calibrated' or 'factory'", source)
    q = _mapping(file, f"{serial}.quality", body.get("quality") or {})
    quality = Quality(*(_opt_number(file, f"{serial}.quality.{k}", q.get(k)) for k in (
        "rms_reprojection_px", "belt_residual_rms_mm", "fill_rate")))
    return CameraCalibration(
        serial=serial, intrinsics=intr,
        depth_scale_m=_number(file, f"{serial}.depth_scale_m", body.get("depth_scale_m", 0.001),
                              positive=True),
        pose=_pose(file, f"{serial}.pose", body.get("pose")),
        region=_region(file, f"{serial}.inspection_region", body.get("inspection_region")),
        calibrated_at=str(body.get("calibrated_at", "")),
        tool_version=str(body.get("tool_version", "")),
        quality=quality, intrinsics_source=source)


def load_camera_calibration(path: Path | str, *, serial: str | None = None,
                            resolution: tuple[int, int] | None = None) -> CameraCalibration:
    """Read a calibration YAML; check it is for camera `serial` at `resolution` (width, height).

    Raises `CalibrationError` (a `ConfigError`) naming the file, key and problem.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(p, "", "file does not exist; run edge-calibrate to make it"
                               ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(p, "", f"cannot read the file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CalibrationError(p, "", f"not valid YAML{where}; re-run edge-calibrate") from None
    cal = calibration_from_mapping(p, data)
    if serial is not None and cal.serial != str(serial):
        raise CalibrationError(p, cal.serial, f"this calibration is for camera {cal.serial}, not "
                               f"{serial}: point the camera at its own calibration file")
    if resolution is not None:
        have = (cal.intrinsics.width, cal.intrinsics.height)
        if have != tuple(resolution):
            raise CalibrationError(
                p, f"{cal.serial}.intrinsics", f"calibrated at {have[0]}x{have[1]}, but the camera "
                f"streams {resolution[0]}x{resolution[1]}: calibrate at the streaming resolution")
    return cal
