"""Reports an engineer opens on a laptop: summary.yaml / summary.json and PNG images.

Images: detected corners (a contact sheet of the views), reprojection error
vectors (all views on one canvas, arrows magnified), and the plane-residual
heat map of the belt (height above the fitted plane, mm, with a scale bar).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from calibration.intrinsics import Detection, ViewResult
from edge.types import F32Array, U8Array

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
            (170, 110, 40), (128, 0, 0), (0, 0, 128), (128, 128, 0)]


def _text(img: U8Array, text: str, org: tuple[int, int], scale: float = 0.5,
          colour: tuple[int, int, int] = (0, 0, 0), thickness: int = 1) -> None:
    (w, h), base = cv2.getTextSize(text, _FONT, scale, thickness)
    x, y = org
    cv2.rectangle(img, (x - 3, y - h - 3), (x + w + 3, y + base + 2), (255, 255, 255), -1)
    cv2.putText(img, text, org, _FONT, scale, colour, thickness, cv2.LINE_AA)


def write_summary(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """summary.yaml and summary.json (same content)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(summary, default=_jsonable))
    y, j = out_dir / "summary.yaml", out_dir / "summary.json"
    y.write_text(yaml.safe_dump(clean, sort_keys=False), encoding="utf-8")
    j.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
    return [y, j]


def _jsonable(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def corners_sheet(path: Path, images: Sequence[U8Array], detections: Sequence[Detection | None],
                  labels: Sequence[str], *, tile_width: int = 400, columns: int = 3) -> Path:
    """A contact sheet: each view with its detected corners (first corner circled) and a label."""
    tiles = []
    for img, det, label in zip(images, detections, labels, strict=True):
        bgr = np.array(img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR),
                       dtype=np.uint8)
        if det is not None:
            pts = det.image_points
            for p in pts:
                cv2.circle(bgr, (round(p[0]), round(p[1])), 3, (0, 200, 0), -1, cv2.LINE_AA)
            cv2.polylines(bgr, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False,
                          (0, 160, 255), 1, cv2.LINE_AA)
            cv2.circle(bgr, (round(pts[0][0]), round(pts[0][1])), 8, (0, 0, 255), 2, cv2.LINE_AA)
        scale = tile_width / bgr.shape[1]
        tile = np.asarray(cv2.resize(bgr, (tile_width, round(bgr.shape[0] * scale)),
                                     interpolation=cv2.INTER_AREA), dtype=np.uint8)
        _text(tile, label, (8, 22), 0.55, (0, 0, 200) if det is None else (0, 100, 0), 1)
        tiles.append(tile)
    if not tiles:
        tiles = [np.full((240, tile_width, 3), 255, np.uint8)]
    h = max(t.shape[0] for t in tiles)
    rows = []
    for i in range(0, len(tiles), columns):
        row = [cv2.copyMakeBorder(t, 0, h - t.shape[0], 0, 0, cv2.BORDER_CONSTANT,
                                  value=(255, 255, 255)) for t in tiles[i:i + columns]]
        row += [np.full((h, tile_width, 3), 255, np.uint8)] * (columns - len(row))
        rows.append(np.hstack([cv2.copyMakeBorder(t, 4, 4, 4, 4, cv2.BORDER_CONSTANT,
                                                  value=(255, 255, 255)) for t in row]))
    cv2.imwrite(str(path), np.vstack(rows))
    return path


def reprojection_vectors(path: Path, size: tuple[int, int], views: Sequence[ViewResult],
                         detections: Sequence[Detection], rms_px: float) -> Path:
    """Detected corners of all views on one image-sized canvas, error vectors magnified."""
    w, h = size
    canvas = np.full((h + 60, w, 3), 255, np.uint8)
    max_err = max((float(np.abs(v.residuals_px).max()) for v in views if v.residuals_px.size),
                  default=0.0)
    gain = 1.0 if max_err <= 0 else max(1.0, round(min(200.0, 25.0 / max_err)))
    cv2.rectangle(canvas, (0, 0), (w - 1, h - 1), (160, 160, 160), 1)
    for k, (view, det) in enumerate(zip(views, detections, strict=True)):
        colour = _COLOURS[k % len(_COLOURS)] if view.used else (150, 150, 150)
        for p, r in zip(det.image_points, view.residuals_px, strict=True):
            a = (round(p[0]), round(p[1]))
            b = (round(p[0] + gain * r[0]), round(p[1] + gain * r[1]))
            cv2.circle(canvas, a, 2, colour, -1, cv2.LINE_AA)
            cv2.arrowedLine(canvas, a, b, colour, 1, cv2.LINE_AA, tipLength=0.25)
    _text(canvas, f"reprojection error vectors x{gain:g} (detected -> reprojected); "
          f"RMS {rms_px:.3f} px over {sum(v.used for v in views)} views; grey = rejected",
          (8, h + 24), 0.45)
    _text(canvas, f"largest error {max_err:.2f} px", (8, h + 48), 0.45)
    cv2.imwrite(str(path), canvas)
    return path


def residual_heatmap(path: Path, heights_mm: F32Array, *, limit_mm: float = 10.0,
                     title: str = "height above the fitted belt plane") -> Path:
    """Heat map of per-pixel height above the plane, +-`limit_mm` full scale, no depth = black."""
    valid = np.isfinite(heights_mm)
    norm = np.clip((np.nan_to_num(heights_mm) + limit_mm) / (2 * limit_mm), 0.0, 1.0)
    img = np.asarray(cv2.applyColorMap(np.round(norm * 255).astype(np.uint8),
                                       cv2.COLORMAP_TURBO), dtype=np.uint8)
    img[~valid] = 0
    h, w = heights_mm.shape
    bar_w = 70
    bar = np.full((h, bar_w, 3), 255, np.uint8)
    ramp = np.linspace(255, 0, h - 40).astype(np.uint8)[:, None]
    bar[20:h - 20, 8:28] = cv2.applyColorMap(np.repeat(ramp, 20, axis=1), cv2.COLORMAP_TURBO)
    for frac, label in ((0.0, f"+{limit_mm:g}"), (0.5, "0 mm"), (1.0, f"-{limit_mm:g}")):
        y = round(20 + frac * (h - 41))
        _text(bar, label, (30, y + 5), 0.4)
    footer = np.full((50, w + bar_w, 3), 255, np.uint8)
    _text(footer, title + " (mm); black = no depth", (8, 20), 0.45)
    finite = heights_mm[valid]
    if finite.size:
        _text(footer, f"within +-{limit_mm:g} mm: {np.mean(np.abs(finite) <= limit_mm):.1%} of "
              f"valid pixels; fill rate {valid.mean():.1%}", (8, 42), 0.45)
    cv2.imwrite(str(path), np.vstack([np.hstack([img, bar]), footer]))
    return path


def belt_overlay(path: Path, color: U8Array, markers: dict[int, Any], region_outline: Any,
                 travel_px: tuple[Any, Any] | None) -> Path:
    """The colour view with the inspection region, markers and the travel arrow drawn."""
    img = np.asarray(color.copy() if color.ndim == 3 else cv2.cvtColor(color, cv2.COLOR_GRAY2BGR),
                     dtype=np.uint8)
    if region_outline is not None and len(region_outline):
        cv2.polylines(img, [np.round(region_outline).astype(np.int32).reshape(-1, 1, 2)], True,
                      (0, 255, 0), 2, cv2.LINE_AA)
    for marker_id, c in markers.items():
        cv2.circle(img, (round(c[0]), round(c[1])), 6, (0, 0, 255), 2, cv2.LINE_AA)
        _text(img, f"id {marker_id}", (round(c[0]) + 8, round(c[1]) - 8), 0.5, (0, 0, 200))
    if travel_px is not None:
        a, b = travel_px
        cv2.arrowedLine(img, (round(a[0]), round(a[1])), (round(b[0]), round(b[1])),
                        (255, 0, 255), 3, cv2.LINE_AA, tipLength=0.2)
        _text(img, "travel (+x)", (round(b[0]) + 6, round(b[1])), 0.55, (160, 0, 160))
    cv2.imwrite(str(path), img)
    return path
