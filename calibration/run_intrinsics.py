"""`edge-calibrate intrinsics`: from a folder of images or a live camera (guided)."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import closing
from pathlib import Path

import cv2
import numpy as np

from calibration.boards import BoardSpec
from calibration.intrinsics import (
    CalibrationInputError,
    Detection,
    IntrinsicsResult,
    calibrate,
    coverage,
    detect_board,
    find_images,
    view_coverage_params,
)
from calibration.outcome import Refused, report_dir
from calibration.realsense import camera_frames, recording_info
from calibration.report import corners_sheet, reprojection_vectors, write_summary
from edge.capture.calibration import (
    CalibrationError,
    CameraCalibration,
    Quality,
    load_camera_calibration,
)
from edge.types import Intrinsics, U8Array


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def model_difference(a: Intrinsics, b: Intrinsics, step: int = 16) -> dict[str, float]:
    """How far two camera models disagree: parameter deltas and pixel displacement."""
    u, v = np.meshgrid(np.arange(0, a.width, step, dtype=np.float64),
                       np.arange(0, a.height, step, dtype=np.float64))
    pts = np.stack([u.ravel(), v.ravel()], axis=-1).reshape(-1, 1, 2)
    norm = cv2.undistortPoints(pts, a.matrix(), np.array(a.coeffs)).reshape(-1, 2)
    obj = np.column_stack([norm, np.ones(len(norm))])
    proj, _ = cv2.projectPoints(obj, np.zeros(3), np.zeros(3), b.matrix(), np.array(b.coeffs))
    disp = np.linalg.norm(proj.reshape(-1, 2) - pts.reshape(-1, 2), axis=1)
    return {"fx_percent": round(100.0 * (a.fx / b.fx - 1.0), 3),
            "fy_percent": round(100.0 * (a.fy / b.fy - 1.0), 3),
            "cx_px": round(a.cx - b.cx, 2), "cy_px": round(a.cy - b.cy, 2),
            "mean_displacement_px": round(float(disp.mean()), 3),
            "max_displacement_px": round(float(disp.max()), 3)}


def _detect_folder(folder: Path, spec: BoardSpec, max_edge: float) -> tuple[
        list[Detection], list[U8Array], list[Detection | None], list[str], dict[str, str]]:
    paths = find_images(folder)
    dets: list[Detection] = []
    images: list[U8Array] = []
    all_dets: list[Detection | None] = []
    labels: list[str] = []
    rejected: dict[str, str] = {}
    for p in paths:
        raw = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            rejected[p.name] = "not a readable image"
            continue
        gray = np.asarray(raw, dtype=np.uint8)
        det = detect_board(gray, spec, p.name)
        images.append(gray)
        all_dets.append(det)
        if det is None:
            rejected[p.name] = "board not found"
            labels.append(f"{p.name}: board not found")
        elif det.sharpness_px is not None and det.sharpness_px > max_edge:
            rejected[p.name] = f"blurred: edge width {det.sharpness_px:.1f} px > {max_edge:g} px"
            labels.append(f"{p.name}: blurred")
        else:
            dets.append(det)
            labels.append(p.name)
    if not dets:
        _no_views(folder, spec, len(paths), rejected)
    return dets, images, all_dets, labels, rejected


def _no_views(folder: Path, spec: BoardSpec, count: int, rejected: dict[str, str]) -> None:
    blurred = sum(1 for r in rejected.values() if r.startswith("blurred"))
    if blurred:
        raise CalibrationInputError(
            f"all {blurred} views of {folder} where the board was found are blurred: hold the "
            "board (and camera) still, add light or shorten the exposure, and take them again")
    raise CalibrationInputError(
        f"the board {spec} was not found in any of the {count} images in {folder}: check --board "
        f"({_count_hint(spec)}) and that the whole board is in view, sharp and evenly lit")


def _count_hint(spec: BoardSpec) -> str:
    if spec.kind == "chessboard":
        return ("COLSxROWS counts the inner corners, e.g. a board of 10x7 squares is "
                "chessboard:9x6:SQUARE_MM")
    return "COLSxROWS counts the squares; check the dictionary and the marker size"


def _live_views(args: argparse.Namespace, spec: BoardSpec) -> tuple[
        list[Detection], list[U8Array], str, Intrinsics | None]:
    """Guided capture from a live RealSense (untested here: no camera in CI).

    A frame becomes a view when the whole board is found, sharp, and its
    (x, y, size, skew) differ from every view so far; progress per parameter
    is printed after each view until all are covered or --views are taken.
    """

    dets: list[Detection] = []
    images: list[U8Array] = []
    params: list[tuple[float, float, float, float]] = []
    serial, factory = str(args.camera), None
    _say(f"move the board through the view: all of it, near and far, tilted; "
         f"collecting up to {args.views} views (Ctrl-C to stop early)")
    deadline = time.monotonic() + args.max_seconds
    stream = camera_frames(args.camera, width=args.width, height=args.height)
    try:
        with closing(stream):
            for info, color in stream:
                serial, factory = info.serial, info.color_intrinsics
                if time.monotonic() > deadline:
                    _say(f"{args.max_seconds:g} s are up: calibrating with {len(dets)} views")
                    break
                gray = np.asarray(cv2.cvtColor(color, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
                det = detect_board(gray, spec, f"view{len(dets) + 1:02d}")
                if det is None or (det.sharpness_px or 0.0) > args.max_edge_width:
                    continue
                p = view_coverage_params(det)
                if any(sum(abs(a - b) for a, b in zip(p, q, strict=True)) < 0.2 for q in params):
                    continue  # too like a view we have
                params.append(p)
                dets.append(det)
                images.append(gray)
                progress = coverage(dets)
                _say(f"view {len(dets)}/{args.views}  " + "  ".join(
                    f"{k} [{'#' * round(10 * v):<10}]" for k, v in progress.items()))
                if len(dets) >= args.views or (len(dets) >= args.min_views
                                               and min(progress.values()) >= 1.0):
                    break
    except KeyboardInterrupt:
        _say("stopped: calibrating with the views collected so far")
    return dets, images, serial, factory


def _factory(args: argparse.Namespace, live_factory: Intrinsics | None) -> tuple[
        Intrinsics | None, str | None]:
    if args.factory_from is not None:
        info = recording_info(args.factory_from)
        return info.color_intrinsics or info.depth_intrinsics, info.serial
    return live_factory, None


def run_intrinsics(args: argparse.Namespace) -> int:
    spec: BoardSpec = args.board
    out: Path = args.out
    live_factory = None
    if args.images is not None:
        dets, images, all_dets, labels, rejected = _detect_folder(
            args.images, spec, args.max_edge_width)
        serial = args.serial
    else:
        dets, images, serial, live_factory = _live_views(args, spec)
        all_dets, labels, rejected = list(dets), [d.name for d in dets], {}
    factory, factory_serial = _factory(args, live_factory)
    serial = serial or factory_serial
    if not serial:
        raise CalibrationInputError("give --serial SERIAL: the calibration file is keyed by the "
                                    "camera's serial number (printed on the camera)")
    if len(dets) < args.min_views:
        reasons = ", ".join(f"{n}: {r}" for n, r in rejected.items()) or "none rejected"
        not_found = sum(1 for r in rejected.values() if r == "board not found")
        hint = (f"; the board was not found in {not_found} image(s): check --board "
                f"({_count_hint(spec)})" if not_found > len(dets) else "")
        raise CalibrationInputError(
            f"only {len(dets)} usable view(s), at least {args.min_views} are needed ({reasons})"
            f"{hint}: take more sharp views with the whole board in view, spread over the image, "
            "near and far, tilted left/right and up/down")
    result = calibrate(dets, min_views=args.min_views)
    rejected.update(result.rejected)
    rdir = report_dir(args, out.with_name(out.stem + "-report"))
    summary = _summary(spec, result, rejected, serial)
    if args.compare_factory:
        if factory is None:
            raise CalibrationInputError("--compare-factory needs the factory intrinsics: give "
                                        "--factory-from FILE.db3 or use --camera SERIAL")
        summary["factory_difference"] = model_difference(result.intrinsics, factory)
    rdir.mkdir(parents=True, exist_ok=True)
    per_view = {v.name: v for v in result.views}
    labels = [f"{lab}: {per_view[lab].rms_px:.2f} px"
              + ("" if per_view[lab].used else " (outlier)") if lab in per_view else lab
              for lab in labels]
    corners_sheet(rdir / "corners.png", images, all_dets, labels)
    reprojection_vectors(rdir / "reprojection_errors.png", dets[0].image_size, result.views,
                         dets, result.rms_px)
    saved = result.rms_px <= args.max_rms or args.force
    summary["saved"] = str(out) if saved else None
    write_summary(rdir, summary)
    _print_result(result, summary, rdir)
    if not saved:
        raise Refused(f"RMS reprojection error {result.rms_px:.3f} px is above --max-rms "
                      f"{args.max_rms:g} px: not saved (see {rdir}/reprojection_errors.png; "
                      "retake blurred or badly lit views, or --force)")
    _save(out, str(serial), result)
    return 0


def _save(out: Path, serial: str, result: IntrinsicsResult) -> None:
    """Write the calibration; a belt pose already in `out` for this camera is kept."""
    cal = CameraCalibration(serial=serial, intrinsics=result.intrinsics,
                            quality=Quality(rms_reprojection_px=round(result.rms_px, 4)))
    if out.exists():
        try:
            old = load_camera_calibration(out, serial=serial, resolution=(
                result.intrinsics.width, result.intrinsics.height))
        except CalibrationError:
            old = None
        if old is not None and old.pose is not None:
            cal = cal.replace(pose=old.pose, region=old.region, depth_scale_m=old.depth_scale_m,
                              quality=Quality(round(result.rms_px, 4),
                                              old.quality.belt_residual_rms_mm,
                                              old.quality.fill_rate))
            print("kept the belt pose already in the file; re-run edge-calibrate belt "
                  "--intrinsics with this file to refine it with the new intrinsics")
    cal.save(out)
    print(f"saved {out}")


def _summary(spec: BoardSpec, result: IntrinsicsResult, rejected: dict[str, str],
             serial: str) -> dict[str, object]:
    i = result.intrinsics
    return {
        "command": "intrinsics", "serial": serial, "board": str(spec),
        "metric": "RMS reprojection error in pixels: sqrt(mean |detected - reprojected|^2) "
                  "over all corners (per view: over that view's corners)",
        "rms_px": round(result.rms_px, 4),
        "intrinsics": {"width": i.width, "height": i.height, "fx": i.fx, "fy": i.fy, "cx": i.cx,
                       "cy": i.cy, "distortion": list(i.coeffs)},
        "views": [{"image": v.name, "rms_px": round(v.rms_px, 4), "corners": v.corners,
                   "used": v.used} for v in result.views],
        "rejected": rejected,
        "coverage": result.coverage,
        "coverage_note": "ROS camera_calibration style progress: (max - min) of each parameter "
                         "over the views divided by its range, 1.0 = fully covered",
    }


def _print_result(result: IntrinsicsResult, summary: dict[str, object], rdir: Path) -> None:
    i = result.intrinsics
    print(f"RMS reprojection error {result.rms_px:.3f} px over "
          f"{sum(v.used for v in result.views)} views")
    print(f"fx {i.fx:.2f}  fy {i.fy:.2f}  cx {i.cx:.2f}  cy {i.cy:.2f}  distortion "
          + " ".join(f"{c:.5f}" for c in i.coeffs))
    for v in result.views:
        print(f"  {v.name:<24} {v.rms_px:.3f} px{'' if v.used else '  (rejected: outlier)'}")
    print("coverage " + "  ".join(f"{k} {val:.2f}" for k, val in result.coverage.items()))
    if "factory_difference" in summary:
        print(f"difference to factory intrinsics: {summary['factory_difference']}")
    print(f"report: {rdir}")
