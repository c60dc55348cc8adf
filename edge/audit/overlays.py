"""Pictures of why: heat maps, damage boxes and colour-mapped depth over an item's crops.

Everything here is pure (arrays in, arrays out) and runs on the snapshot
writer's thread or at request time on the live page, never on the hot path.

The anomaly map (`Verdict.anomaly_map`) holds nearest-neighbour patch
distances in the crop's pixel grid; its scale depends on the product, so the
heat map is relative: the hottest cell is red, and the *hot area* is every
pixel at or above half of the map's peak above its median (the same rule
`edge.infer.inspector.map_box` uses for damage boxes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import cv2
import numpy as np

from edge.types import BoolArray, DamageFinding, Decision, F32Array, ItemCrop, U8Array, Verdict

#: Display crops are upscaled by this factor (model crops are small).
DISPLAY_SCALE = 2
#: BGR colours of the verdicts.
SIDELINE_BGR = (40, 40, 230)
PASS_BGR = (60, 180, 60)
PENDING_BGR = (0, 200, 240)
_BOX_BGR = (255, 255, 0)
_HEAT_ALPHA = 0.55
#: Heights at or below this (mm) are the belt in the depth view (sensor noise is about 1 mm).
BELT_MM = 3.0


def verdict_bgr(decision: Decision | None) -> tuple[int, int, int]:
    """Red for sideline, green for pass, amber while undecided."""
    if decision is None:
        return PENDING_BGR
    return SIDELINE_BGR if decision is Decision.SIDELINE else PASS_BGR


def ascii_text(text: str, limit: int = 60) -> str:
    """What cv2.putText can draw: printable ASCII, shortened."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "~"


def normalized_map(amap: F32Array) -> F32Array:
    """The map scaled to 0..1: its median (the item's normal texture) to 0, its peak to 1."""
    m = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=0.0)
    base = float(np.median(m))
    span = float(m.max()) - base
    if span <= 1e-9:
        return np.zeros(m.shape, np.float32)
    out: F32Array = np.clip((m - base) / span, 0.0, 1.0).astype(np.float32)
    return out


def hot_area(amap: F32Array, size: int | None = None) -> BoolArray:
    """Pixels at or above half the map's peak (above its median), resized to `size`."""
    norm = normalized_map(amap)
    if size is not None and norm.shape != (size, size):
        norm = np.asarray(cv2.resize(norm, (size, size), interpolation=cv2.INTER_LINEAR),
                          np.float32)
    hot: BoolArray = norm >= 0.5
    return hot


def heat_overlay(color: U8Array, amap: F32Array | None,
                 findings: Iterable[DamageFinding] = (), scale: int = DISPLAY_SCALE) -> U8Array:
    """The crop with the anomaly map blended on (jet colours) and the damage boxes drawn."""
    size = color.shape[1] * scale, color.shape[0] * scale
    base: U8Array = np.asarray(cv2.resize(color, size, interpolation=cv2.INTER_LINEAR), np.uint8)
    out: U8Array = base.copy()
    if amap is not None:
        norm = np.asarray(cv2.resize(normalized_map(amap), size, interpolation=cv2.INTER_LINEAR),
                          np.float32)
        heat = cv2.applyColorMap((norm * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
        alpha = (_HEAT_ALPHA * np.clip(norm * 2.0, 0.15, 1.0))[..., None]
        out = (base * (1.0 - alpha) + heat * alpha).astype(np.uint8)
        contours, _ = cv2.findContours((norm >= 0.5).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1, cv2.LINE_AA)
    for f in findings:
        if f.box_px is None:
            continue
        x, y, w, h = (v * scale for v in f.box_px)
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), _BOX_BGR, 2)
        label = f"{f.type.value} {f.probability:.2f}"
        cv2.putText(out, label, (x + 2, max(12, y - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    _BOX_BGR, 1, cv2.LINE_AA)
    return out


def depth_view(height_mm: F32Array, has_depth: bool = True, scale: int = DISPLAY_SCALE,
               max_mm: float | None = None) -> U8Array:
    """Height above the belt, colour-mapped (turbo); black where unknown."""
    h = np.nan_to_num(np.asarray(height_mm, dtype=np.float32), nan=0.0)
    size = h.shape[1] * scale, h.shape[0] * scale
    if not has_depth or not (h > 0).any():
        img = np.zeros((size[1], size[0], 3), np.uint8)
        cv2.putText(img, "no depth", (8, size[1] // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (200, 200, 200), 1, cv2.LINE_AA)
        return img
    top = max_mm or max(1.0, float(np.percentile(h[h > 0], 99)))
    smooth = cv2.medianBlur(h, 5)  # depth noise only costs bytes in a picture for people
    u8 = (np.clip(smooth / top, 0.0, 1.0) * 255.0).astype(np.uint8)
    img = cv2.applyColorMap(u8, cv2.COLORMAP_TURBO)
    img[smooth <= BELT_MM] = (40, 40, 40)  # the belt (and unknown depth): neutral grey
    out: U8Array = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    return out


def _label(img: U8Array, text: str) -> U8Array:
    out = img.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 16), (0, 0, 0), -1)
    cv2.putText(out, ascii_text(text, 40), (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (255, 255, 255), 1, cv2.LINE_AA)
    return out


def contact_sheet(verdict: Verdict, crops: Mapping[str, ItemCrop],
                  anomaly_camera: str | None) -> U8Array:
    """One row per camera (colour | depth | overlay) under a header with the verdict."""
    rows = []
    for cam, crop in sorted(crops.items()):
        amap = verdict.anomaly_map if cam == anomaly_camera else None
        rows.append(np.hstack([
            _label(np.asarray(cv2.resize(crop.color, (crop.color.shape[1] * DISPLAY_SCALE,
                                                  crop.color.shape[0] * DISPLAY_SCALE)),
                          np.uint8), f"{cam} colour"),
            _label(depth_view(crop.height_mm, crop.has_depth), f"{cam} height"),
            _label(heat_overlay(crop.color, amap, verdict.findings),
                   f"{cam} {'anomaly + ' if amap is not None else ''}damage"),
        ]))
    width = max((r.shape[1] for r in rows), default=3 * 256)
    rows = [r if r.shape[1] == width else np.asarray(cv2.copyMakeBorder(
        r, 0, 0, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(0, 0, 0)), np.uint8)
        for r in rows]
    header = np.zeros((40, width, 3), np.uint8)
    header[:] = verdict_bgr(verdict.decision)
    fused = verdict.scores.fused if verdict.scores is not None else None
    line1 = f"{verdict.item_id}  {verdict.product_id or '?'}  {verdict.decision.value.upper()}"
    line2 = (",".join(r.value for r in verdict.reasons)
             + (f"  fused={fused:.3f}" if fused is not None else "")
             + ("  FAIL-SAFE" if verdict.fail_safe else "") + ("  LATE" if verdict.late else ""))
    cv2.putText(header, ascii_text(line1, 70), (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(header, ascii_text(line2, 70), (6, 34), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (255, 255, 255), 1, cv2.LINE_AA)
    sheet: U8Array = np.vstack([header, *rows]) if rows else header
    return sheet
