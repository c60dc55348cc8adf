"""`edge-calibrate check --config FILE`: every calibrated camera of the node, pass or fail.

One current frame per camera: from the camera (`source: realsense`; untested
here, no camera), from the start of its recording (`source: recording`) or
frame 0 of the synthetic conveyor (`source: synthetic`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from calibration.check import BeltCheckThresholds, check_belt, check_board
from calibration.files import CalibrationError, load_camera_calibration
from calibration.report import residual_heatmap, write_summary
from edge.config import CameraConfig, Config, load_config
from edge.types import U8Array, U16Array


def _frame(cfg: Config, cam: CameraConfig) -> tuple[str, U8Array | None, U16Array, float]:
    """(serial, colour, depth, depth scale) of one current frame of the camera."""
    if cam.source == "recording":
        from calibration.realsense import read_recording
        assert cam.recording is not None  # validated by load_config
        info, frames = read_recording(cam.recording, count=1)
        f = frames[0]
        if f.depth is None:
            raise CalibrationError(cam.recording, "depth", "the recording has no depth stream")
        return info.serial, f.color, f.depth, info.depth_scale_m
    if cam.source == "realsense":  # untested here: no camera in CI
        from calibration.realsense import read_camera
        info, frames = read_camera(str(cam.serial), count=1, width=cam.width, height=cam.height,
                                   fps=cam.fps)
        f = frames[0]
        if f.depth is None:
            raise CalibrationError(str(cam.serial), "depth", "the camera delivered no depth")
        return info.serial, f.color, f.depth, info.depth_scale_m
    from edge.catalogue import load_catalogue
    from edge.sources.synthetic import SyntheticConveyor
    world = SyntheticConveyor(cfg.synthetic, cfg.belt, cfg.cameras, load_catalogue(), 0.0)
    frame = world.render(cam.id, 0)
    return cam.id, frame.color, frame.depth, frame.depth_scale_m


def run_check(args: argparse.Namespace) -> int:
    from calibration.cli import report_dir

    cfg = load_config(args.config)
    cams = [c for c in cfg.cameras if c.calibration is not None]
    if not cams:
        raise CalibrationError(args.config, "cameras[].calibration",
                               "no camera has a calibration file: run edge-calibrate belt and set "
                               "cameras[].calibration")
    th = BeltCheckThresholds(args.max_drift_mm, args.max_tilt_deg, args.min_fill_rate)
    rdir = report_dir(args, Path(args.config).resolve().parent / "calibration-check-report")
    rdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    all_passed = True
    for cam in cams:
        assert cam.calibration is not None
        serial, color, depth, scale = _frame(cfg, cam)
        cal = load_camera_calibration(cam.calibration, serial=serial,
                                      resolution=(depth.shape[1], depth.shape[0]))
        belt = check_belt(cal, depth, scale, th)
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
            from calibration.belt import deproject
            heights = deproject(depth, scale, cal.intrinsics) @ cal.pose.rotation[2, :] + float(
                cal.pose.translation_mm[2])
            residual_heatmap(rdir / f"{cam.id}_belt_residuals.png", heights.astype("float32"),
                             limit_mm=max(5.0, 2 * th.max_drift_mm),
                             title=f"{cam.id}: height above the calibrated belt plane")
        shown = belt.as_dict()
        print(f"{cam.id} ({serial}): {'PASS' if passed else 'FAIL'}  drift {shown['drift_mm']} "
              f"mm, tilt {shown['tilt_deg']} deg, fill {belt.fill_rate:.1%}")
        for reason in belt.reasons + board_reasons:
            print(f"  - {reason}")
    write_summary(rdir, {"command": "check", "config": str(args.config), "passed": all_passed,
                         "thresholds": {"max_drift_mm": th.max_drift_mm,
                                        "max_tilt_deg": th.max_tilt_deg,
                                        "min_fill_rate": th.min_fill_rate,
                                        "max_board_rms_px": args.max_board_rms},
                         "cameras": results})
    print(f"{'all cameras passed' if all_passed else 'check FAILED'}; report: {rdir}")
    return 0 if all_passed else 1
