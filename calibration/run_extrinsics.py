"""`edge-calibrate extrinsics`: camera-to-camera pose from a shared ChArUco board."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import yaml

from calibration.extrinsics import ExtrinsicsResult, camera_to_camera, pose_b_in_belt
from calibration.intrinsics import CalibrationInputError, detect_board, find_images
from calibration.outcome import Refused, report_dir
from calibration.report import corners_sheet, write_summary
from edge.capture.calibration import CameraCalibration, load_camera_calibration
from edge.types import Pose, U8Array


def _load(folder: Path) -> list[tuple[str, U8Array]]:
    out = []
    for p in find_images(folder):
        gray = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise CalibrationInputError(f"{p}: not a readable image")
        out.append((p.name, np.asarray(gray, dtype=np.uint8)))
    return out


def _pose_dict(pose: Pose) -> dict[str, object]:
    return {"rotation": pose.rotation.round(8).tolist(),
            "translation_mm": pose.translation_mm.round(4).tolist()}


def _check_sizes(pairs: tuple[tuple[CameraCalibration, list[tuple[str, U8Array]], str], ...]
                 ) -> None:
    for cal, imgs, which in pairs:
        h, w = imgs[0][1].shape
        if (w, h) != (cal.intrinsics.width, cal.intrinsics.height):
            raise CalibrationInputError(
                f"camera {which} images are {w}x{h} but its calibration is for "
                f"{cal.intrinsics.width}x{cal.intrinsics.height}")


def _summary(args: argparse.Namespace, cal_a: CameraCalibration, cal_b: CameraCalibration,
             result: ExtrinsicsResult) -> dict[str, object]:
    problems = []
    dt, dr = result.belt_translation_diff_mm, result.belt_rotation_diff_deg
    if dt is not None and dr is not None and (dt > args.max_diff_mm or dr > args.max_diff_deg):
        problems.append(
            f"the belt poses imply a camera-to-camera pose {dt:.1f} mm / {dr:.2f} deg from the "
            "board's: re-run edge-calibrate belt for both cameras (or use --update-b)")
    return {
        "command": "extrinsics", "camera_a": cal_a.serial, "camera_b": cal_b.serial,
        "board": str(args.board), "pose_b_from_a": _pose_dict(result.pose_b_from_a),
        "pairs": [{"images": p.name, "used": p.pose_b_from_a is not None,
                   "rms_a_px": p.rms_a_px, "rms_b_px": p.rms_b_px, "problem": p.problem}
                  for p in result.pairs],
        "spread_translation_mm": round(result.spread_translation_mm, 3),
        "spread_rotation_deg": round(result.spread_rotation_deg, 4),
        "belt_consistency": None if dt is None else {
            "translation_mm": round(dt, 3), "rotation_deg": round(dr or 0.0, 4)},
        "problems": problems,
    }


def run_extrinsics(args: argparse.Namespace) -> int:

    path_a, path_b = args.calibrations
    cal_a, cal_b = load_camera_calibration(path_a), load_camera_calibration(path_b)
    images_a, images_b = _load(args.images[0]), _load(args.images[1])
    _check_sizes(((cal_a, images_a, "A"), (cal_b, images_b, "B")))
    result = camera_to_camera(images_a, images_b, args.board, cal_a, cal_b)
    rdir = report_dir(args, args.out.with_name(args.out.stem + "-report"))
    rdir.mkdir(parents=True, exist_ok=True)
    for which, imgs in (("a", images_a), ("b", images_b)):
        corners_sheet(rdir / f"corners_{which}.png", [g for _, g in imgs],
                      [detect_board(g, args.board, n) for n, g in imgs], [n for n, _ in imgs])
    summary = _summary(args, cal_a, cal_b, result)
    write_summary(rdir, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump({
        "format": "edge-calibrate-extrinsics/1", "camera_a": cal_a.serial,
        "camera_b": cal_b.serial, "pose_b_from_a": _pose_dict(result.pose_b_from_a),
        "pairs_used": sum(p.pose_b_from_a is not None for p in result.pairs),
        "spread_translation_mm": summary["spread_translation_mm"],
        "spread_rotation_deg": summary["spread_rotation_deg"]}, sort_keys=False),
        encoding="utf-8")
    t = result.pose_b_from_a.translation_mm
    print(f"camera {cal_a.serial} -> {cal_b.serial}: translation [{t[0]:.1f}, {t[1]:.1f}, "
          f"{t[2]:.1f}] mm from {len(result.pairs)} pair(s), spread "
          f"{result.spread_translation_mm:.2f} mm / {result.spread_rotation_deg:.3f} deg")
    if summary["belt_consistency"] is not None:
        print(f"consistency with the belt poses: {summary['belt_consistency']}")
    print(f"saved {args.out}; report: {rdir}")
    if args.update_b:  # B joins A's belt frame, so it shares A's inspection region
        cal_b.replace(pose=pose_b_in_belt(cal_a, result.pose_b_from_a),
                      region=cal_a.region).save(path_b)
        print(f"updated the belt pose of camera {cal_b.serial} in {path_b} (A's belt frame)")
        return 0
    problems = summary["problems"]
    if isinstance(problems, list) and problems:
        raise Refused(str(problems[0]))
    return 0
