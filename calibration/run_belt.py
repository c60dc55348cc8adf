"""`edge-calibrate belt`: belt plane, travel direction, camera pose and inspection region."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from calibration.belt import (
    PlaneFit,
    find_markers,
    fit_belt_plane,
    inspection_region,
    intersect_plane,
    travel_from_image,
    travel_from_track,
)
from calibration.outcome import Refused, report_dir
from calibration.realsense import RgbdFrame, StreamInfo, read_camera, read_recording
from calibration.report import belt_overlay, residual_heatmap, write_summary
from edge.capture.calibration import (
    CameraCalibration,
    InspectionRegion,
    Quality,
    load_camera_calibration,
)
from edge.perception.plane_fit import BeltFitError, median_depth
from edge.types import FloatArray, Intrinsics, Pose


def _frames(args: argparse.Namespace) -> tuple[StreamInfo, list[RgbdFrame]]:
    if args.frames < 1:
        raise ValueError("--frames must be at least 1")
    if args.recording is not None:
        return read_recording(args.recording, count=args.frames)
    return read_camera(args.camera, count=args.frames, width=args.width, height=args.height,
                       fps=args.fps)  # untested here: no camera in CI


def _intrinsics(args: argparse.Namespace, info: StreamInfo, shape: tuple[int, int]) -> tuple[
        Intrinsics, Literal["calibrated", "factory"], float | None]:
    res = (shape[1], shape[0])
    if args.intrinsics is not None:
        cal = load_camera_calibration(args.intrinsics, serial=info.serial, resolution=res)
        return cal.intrinsics, "calibrated", cal.quality.rms_reprojection_px
    factory = info.color_intrinsics or info.depth_intrinsics
    if factory is None:
        raise BeltFitError("the stream has no intrinsics; give --intrinsics FILE.yaml")
    if (factory.width, factory.height) != res:
        raise BeltFitError(f"factory intrinsics are {factory.width}x{factory.height} but the depth"
                           f" is {res[0]}x{res[1]}")
    return factory, "factory", None


def _travel(args: argparse.Namespace, frames: list[RgbdFrame], intr: Intrinsics,
            fit: PlaneFit) -> tuple[FloatArray, dict[int, Any], str]:
    colors = [f.color for f in frames if f.color is not None]
    if (args.travel_markers is not None or args.travel_track is not None) and not colors:
        raise BeltFitError("the travel markers need the colour stream; record with colour")
    if args.travel_markers is not None:
        up, down = args.travel_markers
        found = find_markers(colors[0], args.aruco_dict)
        missing = [m for m in (up, down) if m not in found]
        if missing:
            raise BeltFitError(
                f"ArUco marker(s) {missing} ({args.aruco_dict}) not found in the colour image "
                f"(found: {sorted(found) or 'none'}): lay both markers flat on the belt in view")
        pts = intersect_plane(np.array([found[up], found[down]]), intr, fit.plane)
        return travel_from_track(list(pts), fit.plane), found, f"markers {up} -> {down}"
    if args.travel_track is not None:
        track = [find_markers(c, args.aruco_dict).get(args.travel_track) for c in colors]
        seen = [t for t in track if t is not None]
        if len(seen) < 2:
            raise BeltFitError(
                f"marker {args.travel_track} was seen in {len(seen)} frame(s): move it "
                "downstream along the belt during the capture (at least 20 cm)")
        pts = intersect_plane(np.array(seen), intr, fit.plane)
        return travel_from_track(list(pts), fit.plane), {args.travel_track: seen[-1]}, \
            f"track of marker {args.travel_track} over {len(seen)} frames"
    return travel_from_image(fit.plane, args.travel_image), {}, f"image {args.travel_image}"


def _project(intr: Intrinsics, pose: Pose, belt_pts: FloatArray) -> FloatArray:
    cam = pose.inverse().apply(belt_pts)
    img, _ = cv2.projectPoints(cam, np.zeros(3), np.zeros(3), intr.matrix(), np.array(intr.coeffs))
    return np.asarray(img.reshape(-1, 2), dtype=np.float64)


def _write_report(rdir: Path, fit: PlaneFit, frames: list[RgbdFrame], intr: Intrinsics,
                  pose: Pose, region: InspectionRegion, markers: dict[int, Any]) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    limit = max(5.0, round(3 * fit.residual_rms_mm))
    residual_heatmap(rdir / "belt_residuals.png", fit.heights_mm, limit_mm=limit)
    first = next((f.color for f in frames if f.color is not None), None)
    if first is None:  # depth-only recording: show the heights as grey levels
        h = np.nan_to_num(fit.heights_mm, nan=0.0)
        span = float(np.ptp(h)) or 1.0
        grey = np.round(255 * (h - h.min()) / span).astype(np.uint8)
        first = np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    color = first
    outline = _project(intr, pose, np.array([
        [region.x_min_mm, region.y_min_mm, 0], [region.x_max_mm, region.y_min_mm, 0],
        [region.x_max_mm, region.y_max_mm, 0], [region.x_min_mm, region.y_max_mm, 0]]))
    arrow = _project(intr, pose, np.array([[0.0, 0, 0], [0.25 * region.x_max_mm, 0, 0]]))
    belt_overlay(rdir / "belt_view.png", color, markers, outline, (arrow[0], arrow[1]))


def run_belt(args: argparse.Namespace) -> int:
    info, frames = _frames(args)
    if not any(f.depth is not None for f in frames):
        raise BeltFitError(f"{args.recording or args.camera}: no depth stream; the belt "
                           "calibration needs depth")
    depth = median_depth([f.depth for f in frames if f.depth is not None])
    intr, source, rms = _intrinsics(args, info, depth.shape)
    fit = fit_belt_plane(depth, info.depth_scale_m, intr)
    travel, markers, travel_how = _travel(args, frames, intr, fit)
    pose, region = inspection_region(fit, intr, travel, size_mm=args.region)
    rdir = report_dir(args, args.out.with_name(args.out.stem + "-report"))
    _write_report(rdir, fit, frames, intr, pose, region, markers)
    problems = []
    if fit.residual_rms_mm > args.max_residual:
        problems.append(f"belt residual RMS {fit.residual_rms_mm:.1f} mm > {args.max_residual:g}"
                        " mm: is the belt empty and flat in view?")
    if fit.fill_rate < args.min_fill:
        problems.append(f"depth fill rate {fit.fill_rate:.0%} < {args.min_fill:.0%}: check the "
                        "emitter, exposure and the lens")
    saved = not problems or args.force
    summary = {
        "command": "belt", "serial": info.serial, "source": str(args.recording or args.camera),
        "frames": len(frames), "intrinsics_source": source,
        "plane_normal_camera": [round(float(v), 6) for v in fit.plane.normal],
        "camera_height_mm": round(fit.plane.offset_mm, 2),
        "residual_rms_mm": round(fit.residual_rms_mm, 3), "fill_rate": round(fit.fill_rate, 4),
        "inlier_fraction": round(fit.inlier_fraction, 4), "travel_from": travel_how,
        "pose": {"rotation": pose.rotation.round(6).tolist(),
                 "translation_mm": pose.translation_mm.round(3).tolist()},
        "inspection_region_mm": {"x": [region.x_min_mm, region.x_max_mm],
                                 "y": [region.y_min_mm, region.y_max_mm]},
        "problems": problems, "saved": str(args.out) if saved else None,
    }
    write_summary(rdir, summary)
    print(f"belt plane: camera {fit.plane.offset_mm:.1f} mm above it, residual RMS "
          f"{fit.residual_rms_mm:.2f} mm, depth fill rate {fit.fill_rate:.1%}; travel from "
          f"{travel_how}; region x {region.x_min_mm:.0f}..{region.x_max_mm:.0f} mm, "
          f"y {region.y_min_mm:.0f}..{region.y_max_mm:.0f} mm")
    print(f"report: {rdir}")
    if not saved:
        raise Refused("; ".join(problems) + " -- not saved (--force to save anyway)")
    CameraCalibration(
        serial=info.serial, intrinsics=intr, depth_scale_m=info.depth_scale_m, pose=pose,
        region=region, intrinsics_source=source,
        quality=Quality(rms, round(fit.residual_rms_mm, 3), round(fit.fill_rate, 4)),
    ).save(args.out)
    print(f"saved {args.out}")
    return 0
