"""Rendered calibration scenes with known truth, for tests and demos.

* `render_board`: a chessboard or ChArUco board (printed on a white sheet in
  front of a grey background) seen by a known camera, lens distortion
  included, anti-aliased by supersampling (box filter).
* `board_views`: board poses that keep the whole board in view, spread over
  the image and tilted, as an engineer would take them.
* `render_belt_depth`: the depth image of an empty belt (optionally with
  boxes on it) with RealSense-like noise; `render_belt_color`: the colour
  image of a belt with ArUco markers lying on it.

Depth noise model (documented, D400-like): stereo depth error grows with the
square of the distance, ``sigma_z = subpixel * z**2 / (f_px * baseline_mm)``
with a subpixel disparity error of 0.08 px and a 50 mm baseline (D435): at
z = 1 m and f = 600 px that is 2.7 mm. Depth is quantized to the depth unit;
pixels drop out at random (``dropout``, default 2 %) and a band at the left
edge is invalid, as on a D400 whose left imager sees what the right one does
not (``left_band_px``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from calibration.boards import BoardSpec
from edge.types import FloatArray, Intrinsics, Pose, U8Array, U16Array

_PAPER_GREY = 225.0
_INK_GREY = 25.0
_BACKGROUND = 110.0
_TEXTURE_PX_PER_MM = 8.0


def undistorted_rays(intr: Intrinsics, supersample: int = 1) -> FloatArray:
    """(H*s, W*s, 2) normalized, undistorted image coordinates of every (sub)pixel centre.

    Inverts OpenCV's 5-coefficient model by fixed-point iteration (to 1e-9).
    """
    s = supersample
    u = (np.arange(intr.width * s, dtype=np.float64) + 0.5) / s - 0.5
    v = (np.arange(intr.height * s, dtype=np.float64) + 0.5) / s - 0.5
    xd = np.broadcast_to(((u - intr.cx) / intr.fx)[None, :], (v.size, u.size))
    yd = np.broadcast_to(((v - intr.cy) / intr.fy)[:, None], (v.size, u.size))
    k1, k2, p1, p2, k3 = intr.coeffs
    x, y = xd.copy(), yd.copy()
    if any(intr.coeffs):
        for _ in range(40):
            r2 = x * x + y * y
            radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
            dx = 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
            dy = p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
            x_new, y_new = (xd - dx) / radial, (yd - dy) / radial
            step = float(np.max(np.abs(x_new - x)) + np.max(np.abs(y_new - y)))
            x, y = x_new, y_new
            if step < 1e-10:
                break
    return np.stack([x, y], axis=-1)


def _board_coords(rays: FloatArray, rvec: FloatArray, tvec: FloatArray) -> tuple[
        FloatArray, FloatArray, FloatArray]:
    """Board-plane (u, v) in mm hit by each ray, and a mask of rays that hit it in front."""
    R, _ = cv2.Rodrigues(np.asarray(rvec, dtype=np.float64))
    H = np.column_stack([R[:, 0], R[:, 1], np.asarray(tvec, dtype=np.float64).reshape(3)])
    Hinv = np.linalg.inv(H)
    x, y = rays[..., 0], rays[..., 1]
    bu = Hinv[0, 0] * x + Hinv[0, 1] * y + Hinv[0, 2]
    bv = Hinv[1, 0] * x + Hinv[1, 1] * y + Hinv[1, 2]
    bw = Hinv[2, 0] * x + Hinv[2, 1] * y + Hinv[2, 2]
    front = bw > 0  # the hit lies in front of the camera
    with np.errstate(divide="ignore", invalid="ignore"):
        return bu / bw, bv / bw, front


def _chessboard_shade(spec: BoardSpec, bu: FloatArray, bv: FloatArray) -> FloatArray:
    i = np.floor(bu / spec.square_mm).astype(np.int64) + 1
    j = np.floor(bv / spec.square_mm).astype(np.int64) + 1
    on_grid = (i >= 0) & (i <= spec.cols) & (j >= 0) & (j <= spec.rows)
    black = on_grid & ((i + j) % 2 == 0)
    return np.where(black, _INK_GREY, _PAPER_GREY)


def _charuco_shade(spec: BoardSpec, bu: FloatArray, bv: FloatArray) -> FloatArray:
    width_mm, height_mm = spec.size_mm
    size = (round(width_mm * _TEXTURE_PX_PER_MM), round(height_mm * _TEXTURE_PX_PER_MM))
    texture = spec.charuco_board().generateImage(size, marginSize=0, borderBits=1)
    tex = np.where(texture > 127, _PAPER_GREY, _INK_GREY).astype(np.float32)
    map_x = (bu * _TEXTURE_PX_PER_MM - 0.5).astype(np.float32)
    map_y = (bv * _TEXTURE_PX_PER_MM - 0.5).astype(np.float32)
    sampled = cv2.remap(tex, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=_PAPER_GREY)
    return sampled.astype(np.float64)


def _paper_bounds(spec: BoardSpec) -> tuple[float, float, float, float]:
    """Extent of the white sheet (u0, u1, v0, v1) in board coordinates, one square of margin."""
    w, h = spec.size_mm
    sq = spec.square_mm
    if spec.kind == "chessboard":  # board origin is the first inner corner
        return (-2.0 * sq, w, -2.0 * sq, h)
    return (-sq, w + sq, -sq, h + sq)


def render_board(spec: BoardSpec, intr: Intrinsics, rvec: FloatArray, tvec: FloatArray, *,
                 supersample: int = 3, blur_px: float = 0.0, noise_sigma: float = 0.0,
                 seed: int = 0, rays: FloatArray | None = None) -> U8Array:
    """A grey-level view (H, W) uint8 of the board at pose (rvec, tvec): board -> camera, mm.

    `rays` (from `undistorted_rays(intr, supersample)`) can be passed to
    render many views of one camera faster.
    """
    if rays is None:
        rays = undistorted_rays(intr, supersample)
    bu, bv, front = _board_coords(rays, rvec, tvec)
    bu = np.where(front, bu, -1e9)
    bv = np.where(front, bv, -1e9)
    u0, u1, v0, v1 = _paper_bounds(spec)
    on_paper = (bu >= u0) & (bu <= u1) & (bv >= v0) & (bv <= v1)
    shade = _chessboard_shade(spec, bu, bv) if spec.kind == "chessboard" else _charuco_shade(
        spec, np.where(on_paper, bu, 0.0), np.where(on_paper, bv, 0.0))
    fine = np.where(on_paper, shade, _BACKGROUND).astype(np.float32)
    image = np.asarray(cv2.resize(fine, (intr.width, intr.height), interpolation=cv2.INTER_AREA),
                       dtype=np.float64)
    if blur_px > 0:
        image = np.asarray(cv2.GaussianBlur(image, (0, 0), blur_px), dtype=np.float64)
    if noise_sigma > 0:
        image = image + np.random.default_rng(seed).normal(0.0, noise_sigma, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> FloatArray:
    rx, ry, rz = np.radians([rx_deg, ry_deg, rz_deg])
    Rx = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    Ry = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    Rz = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return np.asarray(Rz @ Ry @ Rx, dtype=np.float64)


def board_views(spec: BoardSpec, intr: Intrinsics, count: int, *, seed: int = 0,
                distance_mm: tuple[float, float] = (350.0, 650.0), max_tilt_deg: float = 35.0,
                margin_px: float = 12.0) -> list[tuple[FloatArray, FloatArray]]:
    """`count` board poses (rvec, tvec), board -> camera, with every corner in view.

    The board centres are spread over a grid of image positions and tilted
    both ways, so that the views constrain focal length and principal point.
    """
    rng = np.random.default_rng(seed)
    obj = spec.object_points()
    centre = obj.mean(axis=0)
    views: list[tuple[FloatArray, FloatArray]] = []
    grid = [(gx, gy) for gy in (0.3, 0.5, 0.7) for gx in (0.3, 0.5, 0.7)]
    attempts = 0
    while len(views) < count and attempts < 5000:
        attempts += 1
        gx, gy = grid[len(views) % len(grid)]
        px = (gx + rng.uniform(-0.08, 0.08)) * intr.width
        py = (gy + rng.uniform(-0.08, 0.08)) * intr.height
        z = rng.uniform(*distance_mm)
        k = len(views)
        tilt_x = max_tilt_deg * (0.4 + 0.6 * rng.uniform()) * (1 if k % 2 else -1)
        tilt_y = max_tilt_deg * (0.4 + 0.6 * rng.uniform()) * (1 if (k // 2) % 2 else -1)
        R = _rotation(tilt_x, tilt_y, rng.uniform(-20.0, 20.0))
        target = np.array([(px - intr.cx) / intr.fx * z, (py - intr.cy) / intr.fy * z, z])
        t = target - R @ centre
        rvec = np.asarray(cv2.Rodrigues(R)[0], dtype=np.float64).reshape(3)
        img, _ = cv2.projectPoints(obj, rvec, t, intr.matrix(), np.array(intr.coeffs))
        img = img.reshape(-1, 2)
        cam = obj @ R.T + t
        inside = (
            np.all(cam[:, 2] > 50.0)
            and np.all(img[:, 0] > margin_px) and np.all(img[:, 0] < intr.width - margin_px)
            and np.all(img[:, 1] > margin_px) and np.all(img[:, 1] < intr.height - margin_px)
        )
        if inside:
            views.append((rvec, t))
    if len(views) < count:
        raise ValueError(f"could only place {len(views)} of {count} board views in the image")
    return views


@dataclass(frozen=True, slots=True)
class DepthNoise:
    """RealSense-like depth noise (see the module docstring)."""

    subpixel: float = 0.08
    baseline_mm: float = 50.0
    dropout: float = 0.02
    left_band_px: int = 16

    def sigma_mm(self, z_mm: FloatArray, f_px: float) -> FloatArray:
        return self.subpixel * z_mm**2 / (f_px * self.baseline_mm)


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box standing on the belt (belt frame, mm)."""

    x_mm: float
    y_mm: float
    length_mm: float
    width_mm: float
    height_mm: float


def _belt_hits(intr: Intrinsics, pose: Pose, belt_width_mm: float | None, floor_drop_mm: float,
               boxes: tuple[Box, ...]) -> FloatArray:
    """Camera-z (mm) of the first surface each pixel's ray hits (inf: nothing)."""
    rays = undistorted_rays(intr)
    r_cam = np.concatenate([rays, np.ones((*rays.shape[:2], 1))], axis=-1)
    d = r_cam @ pose.rotation.T  # belt-frame direction per unit camera z
    c = pose.translation_mm
    with np.errstate(divide="ignore", invalid="ignore"):
        t_belt = np.where(d[..., 2] < 0, -c[2] / d[..., 2], np.inf)
        hit_y = c[1] + t_belt * d[..., 1]
        if belt_width_mm is not None:
            off_belt = np.abs(hit_y) > belt_width_mm / 2
            t_floor = np.where(d[..., 2] < 0, -(c[2] + floor_drop_mm) / d[..., 2], np.inf)
            t_belt = np.where(off_belt, t_floor, t_belt)
        for box in boxes:
            lo = np.array([box.x_mm - box.length_mm / 2, box.y_mm - box.width_mm / 2, 0.0])
            hi = np.array([box.x_mm + box.length_mm / 2, box.y_mm + box.width_mm / 2,
                           box.height_mm])
            t1 = (lo - c) / d
            t2 = (hi - c) / d
            t_near = np.nanmax(np.minimum(t1, t2), axis=-1)
            t_far = np.nanmin(np.maximum(t1, t2), axis=-1)
            hit = (t_near <= t_far) & (t_near > 0)
            t_belt = np.where(hit & (t_near < t_belt), t_near, t_belt)
    return np.asarray(t_belt, dtype=np.float64)


def render_belt_depth(intr: Intrinsics, pose: Pose, *, depth_scale_m: float = 0.001,
                      noise: DepthNoise | None = None, seed: int = 0,
                      belt_width_mm: float | None = None, floor_drop_mm: float = 400.0,
                      boxes: tuple[Box, ...] = ()) -> U16Array:
    """Depth (H, W) uint16 of the belt plane z = 0 seen by a camera at `pose` (camera -> belt).

    Outside `belt_width_mm` (if given) the rays hit a floor `floor_drop_mm`
    below the belt. `noise=None` renders exact (only quantized) depth.
    """
    z = _belt_hits(intr, pose, belt_width_mm, floor_drop_mm, boxes)
    valid = np.isfinite(z) & (z > 0)
    z = np.where(valid, z, 0.0)
    rng = np.random.default_rng(seed)
    if noise is not None:
        z = z + rng.normal(0.0, 1.0, z.shape) * noise.sigma_mm(z, intr.fx)
        valid &= rng.uniform(size=z.shape) >= noise.dropout
        valid[:, : noise.left_band_px] = False
    units = np.rint(z / (depth_scale_m * 1000.0))
    units = np.where(valid & (units > 0) & (units < 65535), units, 0)
    return units.astype(np.uint16)


def render_belt_color(intr: Intrinsics, pose: Pose, markers: tuple[tuple[int, float, float], ...],
                      *, marker_mm: float = 80.0, dictionary: str = "DICT_4X4_50",
                      supersample: int = 2) -> U8Array:
    """BGR view of a dark belt with ArUco markers (id, x_mm, y_mm) lying flat on it.

    Each marker sits on a white square one bit wider than the marker; its
    top edge points downstream (+x) when seen from above.
    """
    rays = undistorted_rays(intr, supersample)
    r_cam = np.concatenate([rays, np.ones((*rays.shape[:2], 1))], axis=-1)
    d = r_cam @ pose.rotation.T
    c = pose.translation_mm
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[..., 2] < 0, -c[2] / d[..., 2], np.nan)
    bx, by = c[0] + t * d[..., 0], c[1] + t * d[..., 1]
    image = np.full(bx.shape, 60.0, dtype=np.float32)
    dic = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, dictionary))
    px = 240
    for marker_id, mx, my in markers:
        tag = cv2.aruco.generateImageMarker(dic, marker_id, px, borderBits=1)
        white = np.full((px + 2 * px // 6, px + 2 * px // 6), 255, np.uint8)
        white[px // 6 : px // 6 + px, px // 6 : px // 6 + px] = tag
        side = marker_mm * white.shape[0] / px
        # image column <- -y (right when looking downstream from above), row <- -x (top = +x)
        col = (-(by - my) / side + 0.5) * white.shape[1] - 0.5
        row = (-(bx - mx) / side + 0.5) * white.shape[0] - 0.5
        tex = np.where(white > 127, 235.0, 20.0).astype(np.float32)
        sampled = cv2.remap(tex, np.nan_to_num(col, nan=-1e6).astype(np.float32),
                            np.nan_to_num(row, nan=-1e6).astype(np.float32), cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
        image = np.where(sampled >= 0, sampled, image)
    image = cv2.resize(image, (intr.width, intr.height), interpolation=cv2.INTER_AREA)
    grey = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
