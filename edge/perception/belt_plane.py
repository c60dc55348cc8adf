"""Belt-plane geometry for one camera: depth pixels to heights and belt coordinates.

Lens distortion is ignored here: RealSense colour streams have small
distortion and depth is aligned to colour by the SDK; at the inspection
distances (0.6-1.2 m) the error is well under the depth noise.
"""

from __future__ import annotations

import numpy as np

from edge.types import F32Array, FloatArray, Intrinsics, Pose, U16Array


class BeltPlane:
    """A calibrated camera above the belt plane z = 0 (belt frame).

    Per pixel it precomputes the viewing ray in belt coordinates, so that a
    depth image turns into heights with one multiply-add per pixel.
    """

    def __init__(self, intrinsics: Intrinsics, pose: Pose) -> None:
        self.intrinsics = intrinsics
        self.pose = pose
        h, w = intrinsics.height, intrinsics.width
        u = (np.arange(w, dtype=np.float64) - intrinsics.cx) / intrinsics.fx
        v = (np.arange(h, dtype=np.float64) - intrinsics.cy) / intrinsics.fy
        rays_cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((h, w))), axis=-1)
        rays_belt = rays_cam @ pose.rotation.T  # direction per unit camera-z
        #: belt-frame ray direction per pixel, scaled so that camera z == 1 (H, W, 3)
        self.rays = rays_belt.astype(np.float32)
        # The height map needs only the z component: a contiguous copy reads a third of the
        # memory that the strided view of `rays` does, on every frame.
        self._rays_z: F32Array = np.ascontiguousarray(self.rays[..., 2])
        self._t = pose.translation_mm.astype(np.float32)  # read by the renderer too
        with np.errstate(divide="ignore"):
            belt_z = np.where(rays_belt[..., 2] < -1e-6,
                              -pose.translation_mm[2] / rays_belt[..., 2], 0.0)
        #: camera depth (mm) of the empty belt at every pixel (0 where the ray misses it)
        self.belt_depth_mm: F32Array = belt_z.astype(np.float32)

    def height_map(self, depth: U16Array, depth_scale_m: float, out: F32Array | None = None,
                   roi: tuple[int, int, int, int] | None = None) -> F32Array:
        """Height above the belt (mm) per pixel; NaN where depth is invalid (0). With `roi`
        (x0, y0, x1, y1), of that part of the image only (`depth` is the whole image)."""
        rays_z = self._rays_z
        if roi is not None:
            x0, y0, x1, y1 = roi
            depth, rays_z = depth[y0:y1, x0:x1], rays_z[y0:y1, x0:x1]
        scale = np.float32(depth_scale_m * 1000.0)
        if out is None:
            out = np.empty(depth.shape, dtype=np.float32)
        np.multiply(depth, scale, out=out, casting="unsafe")
        zero = depth == 0
        out *= rays_z
        out += self._t[2]
        out[zero] = np.nan
        return out

    def item_depth_window(self, depth_scale_m: float, min_height_mm: float
                          ) -> tuple[U16Array, U16Array]:
        """Per pixel, the raw depth values `lo..hi` (inclusive) whose `height_map` is above
        `min_height_mm`, to the last bit of its float32 arithmetic.

        The item finder then compares each frame's depth with these as integers: no float
        image is computed, read and written per frame (2.4 MB of memory traffic at 640x480,
        on a device whose cores share one memory bus). Height is monotonic in depth along a
        ray, so the values form one interval (empty: `lo` 1, `hi` 0). Computed once per camera
        (about 20 bisection steps over the image).
        """
        s = np.float32(depth_scale_m * 1000.0)
        m = np.float32(min_height_mm)
        tz = self._t[2]
        lo = np.empty(self._rays_z.shape, np.uint16)
        hi = np.empty(self._rays_z.shape, np.uint16)
        # A band of rows at a time: the bisection's temporaries stay small (a process keeps
        # heap it once used; every item worker would hold the whole image's worth more).
        for top in range(0, self._rays_z.shape[0], 32):
            rz = self._rays_z[top:top + 32]
            lo[top:top + 32], hi[top:top + 32] = _depth_window(rz, tz, s, m)
        return lo, hi

    def belt_xy(self, depth: U16Array, depth_scale_m: float) -> tuple[F32Array, F32Array]:
        """Belt-frame x and y (mm) of every pixel's 3D point (NaN where invalid)."""
        z = depth.astype(np.float32) * np.float32(depth_scale_m * 1000.0)
        z[depth == 0] = np.nan
        x = z * self.rays[..., 0] + self._t[0]
        y = z * self.rays[..., 1] + self._t[1]
        return x, y

    def points(self, depth_mm: F32Array) -> F32Array:
        """Belt-frame points (H, W, 3) for a float depth image in mm."""
        return depth_mm[..., None] * self.rays + self._t

    def project(self, points_belt: FloatArray) -> FloatArray:
        """Pixel coordinates (N, 2) of belt-frame points (N, 3); NaN behind the camera."""
        pts = np.asarray(points_belt, dtype=np.float64).reshape(-1, 3)
        cam = self.pose.inverse().apply(pts)
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.intrinsics.fx * cam[:, 0] / z + self.intrinsics.cx
            v = self.intrinsics.fy * cam[:, 1] / z + self.intrinsics.cy
        out = np.stack([u, v], axis=1)
        out[z <= 1e-6] = np.nan
        return out

    def pixel_size_mm(self, height_mm: float = 0.0) -> float:
        """Approximate footprint of one pixel (mm) at a height above the belt, image centre."""
        cz = self.pose.translation_mm[2] - height_mm
        ray = self.rays[self.intrinsics.height // 2, self.intrinsics.width // 2]
        dist = cz / max(1e-6, -float(ray[2]))
        return float(dist / self.intrinsics.fx)


def _depth_window(rz: F32Array, tz: np.float32, s: np.float32, m: np.float32
                  ) -> tuple[U16Array, U16Array]:
    """`BeltPlane.item_depth_window` for rays with z components `rz`."""

    def above(d: np.ndarray) -> np.ndarray:
        # The operations of BeltPlane.height_map, in its order and precision.
        h = d.astype(np.float32) * s
        h *= rz
        h += tz
        return np.asarray(h > m)

    # Rounding is monotonic, so the float32 height is too: bisect 0..65536 per pixel.
    falling = rz < 0  # the window is 1..hi; else (level or rising rays) lo..65535
    a = np.zeros(rz.shape, np.int32)
    b = np.full(rz.shape, 1 << 16, np.int32)
    while True:
        open_ = b - a > 1
        if not open_.any():
            break
        mid = (a + b) // 2
        up = above(mid)
        ok, no = up & open_, ~up & open_
        a = np.where((falling & ok) | (~falling & no), mid, a)
        b = np.where((falling & no) | (~falling & ok), mid, b)
    lo = np.where(falling, 1, np.minimum(b, 1 << 16))
    hi = np.where(falling, a, (1 << 16) - 1)
    empty = lo > hi
    lo, hi = np.where(empty, 1, lo), np.where(empty, 0, hi)
    return lo.astype(np.uint16), hi.astype(np.uint16)
