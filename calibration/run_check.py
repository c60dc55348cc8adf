"""`edge-calibrate check --config FILE`: every calibrated camera of the node, pass or fail.

The belt is judged as the node judges it at start (`BeltChecker.check_frames`):
on the per-pixel median of CHECK_FRAMES current depth frames per camera, from
the camera (`source: realsense`; untested here, no camera), from the start of
its recording (`source: recording`) or the first frames of the synthetic
conveyor (`source: synthetic`), with the fill limit the calibration accepted
(`calibrated_thresholds`) unless `--min-fill-rate` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from calibration.check import check_board
from calibration.outcome import report_dir
from calibration.realsense import read_camera, read_recording
from calibration.report import residual_heatmap, write_summary
from edge.capture.calibration import CalibrationError, load_camera_calibration
from edge.catalogue import load_catalogue
from edge.config import CameraConfig, Config, load_config
from edge.perception.belt_check import (
    CHECK_FRAMES,
    BeltChecker,
    BeltCheckThresholds,
    calibrated_thresholds,
)
from edge.perception.plane_fit import deproject
from edge.sim.conveyor import SyntheticConveyor
from edge.types import U8Array, U16Array


def _frames(cfg: Config, cam: CameraConfig, count: int = CHECK_FRAMES
            ) -> tuple[str, U8Array | None, list[U16Array], float]:
    """(serial, colour of the first frame, up to `count` depth images, depth scale) of the
    camera's current frames."""
    if cam.source in ("recording", "realsense"):
        if cam.source == "recording":
            assert cam.recording is not None  # validated by load_config
            where = str(cam.recording)
            info, frames = read_recording(cam.recording, count=count)
        else:  # untested here: no camera in CI
            where = str(cam.serial)
            info, frames = read_camera(where, count=count, width=cam.width,
                                       height=cam.height, fps=cam.fps)
        depths = [f.depth for f in frames if f.depth is not None]
        if not depths:
            raise CalibrationError(where, "depth", "no depth frames from this camera")
        return info.serial, frames[0].color, depths, info.depth_scale_m
    world = SyntheticConveyor(cfg.synthetic, cfg.belt, cfg.cameras, load_catalogue(), 0.0)
    rendered = [world.render(cam.id, k) for k in range(count)]
    return (cam.id, rendered[0].color, [f.depth for f in rendered],
            rendered[0].depth_scale_m)


def run_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    cams = [c for c in cfg.cameras if c.calibration is not None]
    if not cams:
        raise CalibrationError(args.config, "cameras[].calibration",
                               "no camera has a calibration file: run edge-calibrate belt and set "
                               "cameras[].calibration")
    given = BeltCheckThresholds(args.max_drift_mm, args.max_tilt_deg,
                                *([] if args.min_fill_rate is None else [args.min_fill_rate]))
    rdir = report_dir(args, Path(args.config).resolve().parent / "calibration-check-report")
    rdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    thresholds: dict[str, float] = {}  # the fill limit per camera
    all_passed = True
    for cam in cams:
        assert cam.calibration is not None
        serial, color, depths, scale = _frames(cfg, cam)
        depth = depths[0]
        cal = load_camera_calibration(cam.calibration, serial=serial,
                                      resolution=(depth.shape[1], depth.shape[0]))
        # As the node checks at start: the fill rate the calibration accepted, less a margin,
        # unless the engineer named a limit.
        th = given if args.min_fill_rate is not None else calibrated_thresholds(cal, given)
        belt = BeltChecker(cal, th).check_frames(depths, scale)
        thresholds[cam.id] = th.min_fill_rate
        entry: dict[str, object] = {"serial": serial, "belt": belt.as_dict()}
        passed = belt.passed
        board_reasons: tuple[str, ...] = ()
        if args.board is not None and color is not None:
            board = check_board(cal, color, args.board, max_rms_px=args.max_board_rms)
            entry["board"] = board.as_dict()
            passed = passed and board.passed
            board_reasons = board.reasons
        entry["passed"] = passed
        all_passed &= passed
        results[cam.id] = entry
        if cal.pose is not None:
            heights = deproject(depth, scale, cal.intrinsics) @ cal.pose.rotation[2, :] + float(
                cal.pose.translation_mm[2])
            residual_heatmap(rdir / f"{cam.id}_belt_residuals.png", heights.astype("float32"),
                             limit_mm=max(5.0, 2 * given.max_drift_mm),
                             title=f"{cam.id}: height above the calibrated belt plane")
        shown = belt.as_dict()
        print(f"{cam.id} ({serial}): {'PASS' if passed else 'FAIL'}  drift {shown['drift_mm']} "
              f"mm, tilt {shown['tilt_deg']} deg, fill {belt.fill_rate:.1%} "
              f"(median of {len(depths)} frames, limit {th.min_fill_rate:.0%})")
        for reason in belt.reasons + board_reasons:
            print(f"  - {reason}")
    write_summary(rdir, {"command": "check", "config": str(args.config), "passed": all_passed,
                         "thresholds": {"max_drift_mm": given.max_drift_mm,
                                        "max_tilt_deg": given.max_tilt_deg,
                                        "min_fill_rate": thresholds,
                                        "max_board_rms_px": args.max_board_rms},
                         "cameras": results})
    print(f"{'all cameras passed' if all_passed else 'check FAILED'}; report: {rdir}")
    return 0 if all_passed else 1
