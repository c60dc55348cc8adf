"""Rasterizes the synthetic scene into RealSense-like RGB-D frames for one camera.

Items are boxes (multipacks: a grid of unit boxes). Each visible face is a
plane, so its depth along every pixel's ray is one division over the face's
bounding rectangle; a z-buffer resolves occlusion. Depth noise follows a
stereo camera: sigma grows with distance squared; pixels at depth edges and
on dark surfaces drop out (0), as they do on a D4xx.
"""

from __future__ import annotations

import dataclasses
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from edge.capture.buffers import FrameBuffers
from edge.perception.belt_plane import BeltPlane
from edge.sim.artwork import (
    TopSurface,
    contents_box,
    contents_colour,
    damaged_top,
    spill_colour,
)
from edge.sim.world import Damage, SceneItem, top_faces
from edge.types import BoolArray, DamageType, F32Array, FloatArray, Intrinsics, Pose, U8Array

#: Stereo depth RMS error model: sigma_mm = K * z_mm^2 (subpixel 0.08, f 383 px, baseline 50 mm).
DEPTH_NOISE_K = 0.08 / (383.0 * 50.0)
#: Depth jump (mm) between neighbours that counts as an edge, and the dropout there.
EDGE_JUMP_MM = 15.0
EDGE_DROPOUT = 0.5
#: Grey level under which stereo matching fails often.
DARK_LUMA = 30
DARK_DROPOUT = 0.6
BELT_BGR = (58, 60, 62)
_KERNEL3 = np.ones((3, 3), np.uint8)
FRAME_BGR = (150, 150, 145)


#: (dims, centre x/y, unit index, base z, flat colour) of one box of an item
_Part = tuple[tuple[float, float, float], FloatArray, int, float, tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class RenderedView:
    color: U8Array
    depth_mm: F32Array  # noise-free
    labels: np.ndarray  # uint16, 0 = background
    damage: BoolArray


class CameraRig:
    """One synthetic camera: intrinsics, pose and its precomputed empty belt."""

    def __init__(self, camera_id: str, intrinsics: Intrinsics, pose: Pose, belt_width_mm: float,
                 seed: int) -> None:
        self.camera_id = camera_id
        self.intrinsics = intrinsics
        self.pose = pose
        self.plane = BeltPlane(intrinsics, pose)
        depth = self.plane.belt_depth_mm
        pts = self.plane.points(depth)
        on_belt = np.abs(pts[..., 1]) <= belt_width_mm / 2
        rng = np.random.default_rng([seed, 0xBE17])
        grain = rng.normal(0, 4, depth.shape).astype(np.float32)
        bg = np.where(on_belt[..., None], np.array(BELT_BGR, np.float32),
                      np.array(FRAME_BGR, np.float32)) + grain[..., None]
        self.background: U8Array = np.clip(bg, 0, 255).astype(np.uint8)
        self.background_depth: F32Array = depth
        self.colour_noise = [rng.integers(-3, 4, (*depth.shape, 3)).astype(np.int16)
                             for _ in range(3)]
        self._cam = pose.translation_mm
        corners = pts[[0, 0, -1, -1], [0, -1, 0, -1]]
        k = intrinsics
        self._centre_mm = pts[int(k.cy), int(k.cx)].astype(np.float64)
        #: belt-frame x range the camera can see (with margin for item heights)
        self.view_x_mm = (float(corners[:, 0].min()) - 400.0, float(corners[:, 0].max()) + 400.0)

    def belt_motion_px(self, travel_mm: float) -> FloatArray:
        """How far (pixels, x and y) the belt at the image centre moves while it travels."""
        ends = self.plane.project(np.stack([self._centre_mm,
                                            self._centre_mm + np.array([travel_mm, 0.0, 0.0])]))
        return np.asarray(ends[1] - ends[0])

    def face_depth(self, roi: tuple[int, int, int, int], normal: FloatArray, d: float) -> F32Array:
        """Camera depth (mm) of plane n . p = d along each ray inside roi = (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = roi
        rays = self.plane.rays[y0:y1, x0:x1]
        denom = rays @ normal.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (np.float32(d - float(normal @ self._cam))) / denom
        return z.astype(np.float32, copy=False)


def _box_faces(centre: FloatArray, yaw: float, dims: tuple[float, float, float], z0: float
               ) -> list[tuple[FloatArray, FloatArray, str]]:
    """(corners 4x3, outward normal, name) of a yawed box standing at height z0."""
    length, width, height = dims
    c, s = np.cos(yaw), np.sin(yaw)
    ex, ey = np.array([c, s, 0.0]), np.array([-s, c, 0.0])
    hl, hw = length / 2, width / 2
    base = np.array([centre[0], centre[1], z0])
    top = base + np.array([0, 0, height])

    def quad(o: FloatArray, a: FloatArray, b: FloatArray) -> FloatArray:
        return np.stack([o - a - b, o + a - b, o + a + b, o - a + b])

    zv = np.array([0, 0, height / 2])
    return [
        (quad(top, ex * hl, ey * hw), np.array([0.0, 0.0, 1.0]), "top"),
        (quad(base + zv + ex * hl, ey * hw, zv), ex, "front"),
        (quad(base + zv - ex * hl, ey * hw, zv), -ex, "back"),
        (quad(base + zv + ey * hw, ex * hl, zv), ey, "left"),
        (quad(base + zv - ey * hw, ex * hl, zv), -ey, "right"),
    ]


class TopCache:
    """Item tops drawn recently, shared by the cameras of one world (thread-safe)."""

    def __init__(self, size: int = 128) -> None:
        # Items are in view for about a second: a few dozen item tops (multipacks: one per
        # unit) cover every item on screen of every camera; more would only hold memory.
        self._tops: OrderedDict[tuple[int, int], TopSurface] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, item: SceneItem, unit: int, dims: tuple[float, float, float]) -> TopSurface:
        key = (item.index, unit)
        with self._lock:
            top = self._tops.get(key)
        if top is None:
            # Drawn outside the lock: two cameras may both draw it, with the same result.
            top = _draw_top(item, unit, dims)
            with self._lock:
                self._tops[key] = top
                while len(self._tops) > self._size:
                    self._tops.popitem(last=False)
        return top


def _draw_top(item: SceneItem, unit: int, dims: tuple[float, float, float]) -> TopSurface:
    """`unit` 0: a single item's top; >= 1000: multipack unit `unit - 1000`."""
    label_seed = zlib.crc32(item.item_id.encode()) if unit in (0, 1000) else None
    if unit < 1000:
        return damaged_top(item.product, dims, item.damage, label_seed=label_seed)
    return damaged_top(item.product, dims, _on_unit(item, unit - 1000), unit=True,
                       label_seed=label_seed)


def _on_unit(item: SceneItem, unit: int) -> Damage | None:
    """The item's damage in unit `unit`'s own coordinates, if it lies on that unit."""
    dmg = item.damage
    if dmg is None:
        return None
    faces = top_faces(item.product, item.dims_mm)
    _, cu, cv, ul, uw = faces[0]
    length, width, _ = item.dims_mm
    along, across = item.product.unit_grid
    i = min(along - 1, max(0, int((dmg.u_mm + length / 2) // ul)))
    j = min(across - 1, max(0, int((dmg.v_mm + width / 2) // uw)))
    k, cu, cv, _, _ = faces[i * across + j]
    if k != unit:
        return None
    return dataclasses.replace(dmg, u_mm=dmg.u_mm - cu, v_mm=dmg.v_mm - cv)


class SceneRenderer:
    """Draws items at their positions at one instant, for one camera rig."""

    def __init__(self, tops: TopCache | None = None) -> None:
        self._tops = tops or TopCache()

    def render(self, rig: CameraRig, placed: list[tuple[SceneItem, float]],
               belt: Callable[[U8Array], None] | None = None) -> RenderedView:
        """`placed`: (item, centre x in the belt frame) of every item to draw; `belt` draws
        on the empty belt first (its dirt)."""
        color = rig.background.copy()
        depth = rig.background_depth.copy()
        labels = np.zeros(depth.shape, dtype=np.uint16)
        damage = np.zeros(depth.shape, dtype=bool)
        if belt is not None:
            belt(color)
        for item, x in placed:
            dmg = item.damage
            if dmg is not None and dmg.type is DamageType.SPILL and dmg.severity == "severe":
                self._draw_spill(rig, item, x, color, damage)
        for label, (item, x) in enumerate(placed, start=1):
            for dims, centre, unit, z0, flat in self._parts(item, x):
                for corners, normal, name in _box_faces(centre, item.yaw_rad, dims, z0):
                    top = (self._tops.get(item, unit, dims) if name == "top" and unit >= 0
                           else None)
                    self._draw_face(rig, corners, normal, name, top, flat, label, color, depth,
                                    labels, damage, is_damage=unit == -2)
        return RenderedView(color, depth, labels, damage)

    @staticmethod
    def _parts(item: SceneItem, x: float) -> list[_Part]:
        """Boxes that make up an item: (dims, centre, unit index, base z, flat colour).

        unit -1: the whole single item; >= 0: a multipack unit; -2: protruding contents.
        """
        length, width, height = item.dims_mm
        centre = np.array([x, item.y_mm])
        colour = item.product.colour_bgr
        parts: list[_Part]
        c, s = np.cos(item.yaw_rad), np.sin(item.yaw_rad)
        if item.product.units > 1:
            along, across = item.product.unit_grid
            ul, uw = length / along, width / across
            missing = item.damage.missing_unit if item.damage else -1
            parts = []
            for i in range(along):
                for j in range(across):
                    k = i * across + j
                    if k == missing:
                        continue
                    du, dv = (i + 0.5) * ul - length / 2, (j + 0.5) * uw - width / 2
                    cxy = centre + np.array([c * du - s * dv, s * du + c * dv])
                    parts.append(((ul, uw, height), cxy, k + 1000, 0.0, colour))
        else:
            parts = [((length, width, height), centre, 0, 0.0, colour)]
        dmg = item.damage
        if dmg is not None and dmg.type is DamageType.DECONSTRUCTION:
            # The contents reach 5 mm into the item and stand `depth_mm` out of its top.
            along_mm, across_mm = contents_box(dmg)
            cxy = centre + np.array([c * dmg.u_mm - s * dmg.v_mm, s * dmg.u_mm + c * dmg.v_mm])
            parts.append(((along_mm, across_mm, dmg.depth_mm + 5.0), cxy, -2, height - 5.0,
                          contents_colour(dmg.seed)))
        return parts

    def _draw_face(self, rig: CameraRig, corners: FloatArray, normal: FloatArray, name: str,
                   top: TopSurface | None, flat: tuple[int, int, int], label: int,
                   color: U8Array, depth: F32Array, labels: np.ndarray, damage: BoolArray,
                   *, is_damage: bool) -> None:
        if float(normal @ (rig.pose.translation_mm - corners[0])) <= 0:
            return  # back face
        px = rig.plane.project(corners)
        if np.isnan(px).any():
            return
        h, w = depth.shape
        x0, y0 = max(0, int(np.floor(px[:, 0].min()))), max(0, int(np.floor(px[:, 1].min())))
        x1, y1 = min(w, int(np.ceil(px[:, 0].max())) + 1), min(h, int(np.ceil(px[:, 1].max())) + 1)
        if x1 <= x0 or y1 <= y0:
            return
        roi = (x0, y0, x1, y1)
        poly = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cv2.fillConvexPoly(poly, np.round((px - [x0, y0]) * 16).astype(np.int32), 1,
                           lineType=cv2.LINE_8, shift=4)
        z = rig.face_depth(roi, normal, float(normal @ corners[0]))
        dz = depth[y0:y1, x0:x1]
        tex_bgra = None
        if top is not None:
            th, tw = top.bgra.shape[:2]
            src = np.array([[0, 0], [tw, 0], [tw, th], [0, th]], dtype=np.float32)
            m = cv2.getPerspectiveTransform(src, (px - [x0, y0]).astype(np.float32))
            size = (x1 - x0, y1 - y0)
            tex_bgra = cv2.warpPerspective(top.bgra, m, size, flags=cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_REPLICATE)
            if top.dent_mm is not None:
                dent = cv2.warpPerspective(top.dent_mm, m, size, flags=cv2.INTER_LINEAR)
                ray_z = rig.plane.rays[y0:y1, x0:x1, 2]
                z = (z + dent / np.maximum(-ray_z, 1e-3)).astype(np.float32)
        vis = (poly > 0) & (z > 0) & (z < dz)
        if not vis.any():
            return
        # Pixels on the rasterized edge of a face seen nearly edge-on hit its plane far outside
        # the face; keep only intersections inside it (1 mm tolerance). A pixel a whole pixel
        # inside the outline sees the face itself: only the outline's band is tested.
        inside = cv2.erode(poly, _KERNEL3, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        rows, cols = np.nonzero(vis & (inside == 0))
        hit = z[rows, cols, None] * rig.plane.rays[rows + y0, cols + x0] + rig.plane._t
        centre = corners.mean(axis=0)
        for axis in (corners[1] - corners[0], corners[3] - corners[0]):
            half = float(np.linalg.norm(axis)) / 2
            off = np.abs((hit - centre) @ (axis / (2 * half)))
            outside = off > half + 1.0
            if outside.any():
                vis[rows[outside], cols[outside]] = False
        dz[vis] = z[vis]
        labels[y0:y1, x0:x1][vis] = label
        croi = color[y0:y1, x0:x1]
        if tex_bgra is not None:
            croi[vis] = tex_bgra[..., :3][vis]
            # Any texel of damage that reaches a pixel marks it: thin tears stay in the mask.
            damage[y0:y1, x0:x1][vis] = tex_bgra[..., 3][vis] > 0
        else:
            shade = {"top": 1.0, "front": 0.8, "back": 0.8, "left": 0.7, "right": 0.62}[name]
            croi[vis] = np.array(flat, dtype=np.float32) * shade
            damage[y0:y1, x0:x1][vis] = is_damage

    @staticmethod
    def _draw_spill(rig: CameraRig, item: SceneItem, x: float, color: U8Array,
                    damage: BoolArray) -> None:
        """A puddle on the belt beside the item, on the side the spill ran to."""
        dmg = item.damage
        assert dmg is not None
        rng = np.random.default_rng(dmg.seed + 1)
        c, s = np.cos(item.yaw_rad), np.sin(item.yaw_rad)
        side = 1.0 if dmg.v_mm >= 0 else -1.0
        dv = side * (item.dims_mm[1] / 2 + dmg.size_mm * 0.5)
        du = dmg.u_mm
        cx, cy = x + c * du - s * dv, item.y_mm + s * du + c * dv
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        r = dmg.size_mm * 0.8 * (1 + 0.2 * rng.standard_normal(24))
        pts = np.stack([cx + r * np.cos(t), cy + 0.6 * r * np.sin(t), np.zeros_like(t)], axis=1)
        px = rig.plane.project(pts)
        if np.isnan(px).any():
            return
        poly = np.round(px * 16).astype(np.int32)
        cv2.fillPoly(color, [poly], spill_colour(dmg.seed), lineType=cv2.LINE_AA, shift=4)
        mask = np.zeros(damage.shape, dtype=np.uint8)
        cv2.fillPoly(mask, [poly], 1, shift=4)
        damage |= mask > 0


def add_sensor_noise(view: RenderedView, rig: CameraRig, rng: np.random.Generator,
                     frame_index: int, buffers: FrameBuffers | None = None, *,
                     color: U8Array | None = None, depth_noise_scale: float = 1.0
                     ) -> tuple[U8Array, np.ndarray]:
    """Colour noise, stereo depth noise and dropouts; returns (BGR, uint16 depth in mm),
    in buffers taken from `buffers` if given. `color`: what the colour sensor sees (default
    the scene's own colours, which also decide where the infrared stereo fails)."""
    z = view.depth_mm
    noise = rng.standard_normal(z.shape, dtype=np.float32)
    noise *= np.float32(DEPTH_NOISE_K * depth_noise_scale) * z * z
    noisy = z + noise
    # Dropouts at depth edges (occlusion shadows) and on dark surfaces.
    jump = np.zeros(z.shape, dtype=bool)
    jump[:, 1:] = np.abs(np.diff(z, axis=1)) > EDGE_JUMP_MM
    jump[1:, :] |= np.abs(np.diff(z, axis=0)) > EDGE_JUMP_MM
    luma = cv2.cvtColor(view.color, cv2.COLOR_BGR2GRAY)
    dark = luma < DARK_LUMA
    for cand, p in ((jump, EDGE_DROPOUT), (dark, DARK_DROPOUT)):
        idx = np.flatnonzero(cand)
        if idx.size:
            noisy.reshape(-1)[idx[rng.random(idx.size) < p]] = 0.0
    noisy += np.float32(0.5)
    np.clip(noisy, 0, 65535, out=noisy)
    depth = buffers.take(z.shape, np.uint16) if buffers else np.empty(z.shape, np.uint16)
    np.copyto(depth, noisy, casting="unsafe")  # truncates, as astype does
    colour_noise = rig.colour_noise[frame_index % len(rig.colour_noise)]
    seen = view.color if color is None else color
    out = buffers.take(seen.shape, np.uint8) if buffers else np.empty(seen.shape, np.uint8)
    cv2.add(seen, colour_noise, dst=out, dtype=cv2.CV_8U)
    return out, depth
