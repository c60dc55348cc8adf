"""`edge-calibrate`: calibration and health checks for the node's cameras.

Exit codes: 0 success (check: all passed), 1 the result is not good enough
(check failed, calibration refused), 2 the input cannot be used (wrong
arguments, missing images, board not found, unreadable files). Errors are one
clear message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from calibration.boards import BoardSpec, BoardSpecError, parse_board
from calibration.intrinsics import CalibrationInputError
from calibration.outcome import EXIT_FAILED, EXIT_INPUT, Refused
from calibration.run_belt import run_belt
from calibration.run_check import run_check
from calibration.run_extrinsics import run_extrinsics
from calibration.run_intrinsics import run_intrinsics
from edge.capture.calibration import CalibrationError
from edge.capture.source import SourceError
from edge.config import ConfigError

log = structlog.get_logger(__name__)

def _board(text: str) -> BoardSpec:
    try:
        return parse_board(text)
    except BoardSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_mm(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LENGTHxWIDTH in mm, e.g. "
                                         "800x600") from None
    if a <= 0 or b <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be > 0")
    return (a, b)


def _ids(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two marker ids, upstream first, "
                                         "e.g. 0,1") from None
    return (a, b)


def _add_intrinsics(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("intrinsics", help="calibrate a camera's lens from views of a board",
                       description="Detect the board in each view (sub-pixel corners), calibrate "
                       "pinhole + 5 distortion coefficients, drop outlier views; quality is the "
                       "RMS reprojection error in pixels.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of board photographs")
    src.add_argument("--camera", metavar="SERIAL", help="live RealSense (guided capture)")
    p.add_argument("--board", type=_board, required=True,
                   help="chessboard:COLSxROWS:SQUARE_MM (inner corners) or "
                   "charuco:COLSxROWS:SQUARE_MM:MARKER_MM:DICT (squares)")
    p.add_argument("--out", type=Path, required=True, help="calibration YAML to write")
    p.add_argument("--serial", help="camera serial the file is for (--images; default: from "
                   "--factory-from or --camera)")
    p.add_argument("--max-rms", type=float, default=0.5, help="refuse to save above this RMS (px)")
    p.add_argument("--force", action="store_true", help="save even if the RMS is above --max-rms")
    p.add_argument("--min-views", type=int, default=6, help="fewest usable views to calibrate")
    p.add_argument("--max-edge-width", type=float, default=4.0,
                   help="chessboards: views whose edges are wider (blurred) than this are dropped")
    p.add_argument("--compare-factory", action="store_true",
                   help="report the difference to the factory intrinsics (--camera or "
                   "--factory-from)")
    p.add_argument("--factory-from", type=Path, metavar="FILE.db3",
                   help="RealSense recording whose colour stream holds the factory intrinsics")
    p.add_argument("--views", type=int, default=20, help="--camera: views to collect at most")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="--camera: stop collecting after this long")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--report", type=Path, help="report folder (default: OUT's name + -report)")


def _add_belt(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("belt", help="fit the belt plane; write the camera's pose in the belt frame",
                       description="Fit the empty belt's plane from depth (RANSAC + least "
                       "squares), find the travel direction, write the pose and the "
                       "inspection region.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recording", type=Path, metavar="FILE.db3", help="RealSense recording")
    src.add_argument("--camera", metavar="SERIAL", help="live RealSense")
    p.add_argument("--out", type=Path, required=True, help="calibration YAML to write")
    p.add_argument("--intrinsics", type=Path, metavar="FILE.yaml",
                   help="calibrated intrinsics to use (default: the camera's factory intrinsics)")
    p.add_argument("--frames", type=int, default=10, help="depth frames to combine (median)")
    p.add_argument("--width", type=int, default=640, help="--camera: stream width")
    p.add_argument("--height", type=int, default=480, help="--camera: stream height")
    p.add_argument("--fps", type=int, default=30, help="--camera: frames per second")
    travel = p.add_mutually_exclusive_group()
    travel.add_argument("--travel-markers", type=_ids, metavar="UP,DOWN",
                        help="two ArUco markers on the belt, the upstream one first")
    travel.add_argument("--travel-track", type=int, metavar="ID",
                        help="one ArUco marker moved downstream along the belt during the capture")
    travel.add_argument("--travel-image", choices=("up", "down", "left", "right"), default="up",
                        help="travel direction as seen in the image (default: up)")
    p.add_argument("--aruco-dict", default="DICT_4X4_50", help="dictionary of the markers")
    p.add_argument("--region", type=_size_mm, metavar="LxW",
                   help="inspection region size in mm (default: all of the belt in view)")
    p.add_argument("--max-residual", type=float, default=8.0,
                   help="refuse to save if the belt residual RMS (mm) is above this")
    p.add_argument("--min-fill", type=float, default=0.5,
                   help="refuse to save if the depth fill rate is below this")
    p.add_argument("--force", action="store_true", help="save even if the checks fail")
    p.add_argument("--report", type=Path, help="report folder (default: OUT's name + -report)")


def _add_extrinsics(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("extrinsics", help="camera-to-camera pose from a shared ChArUco board",
                       description="Pose of camera A in camera B's frame from image pairs of one "
                       "ChArUco board taken by both cameras at the same moments.")
    p.add_argument("--board", type=_board, required=True, help="charuco:COLSxROWS:SQ:MARKER:DICT")
    p.add_argument("--calibrations", type=Path, nargs=2, required=True,
                   metavar=("A.yaml", "B.yaml"), help="calibration files of camera A and B")
    p.add_argument("--images", type=Path, nargs=2, required=True, metavar=("DIR_A", "DIR_B"),
                   help="image folders of camera A and B (pairs matched in name order)")
    p.add_argument("--out", type=Path, required=True, help="extrinsics YAML to write")
    p.add_argument("--update-b", action="store_true",
                   help="write camera B's belt pose (from A's belt pose) into B.yaml")
    p.add_argument("--max-diff-mm", type=float, default=10.0,
                   help="fail if the belt poses disagree with the board by more than this")
    p.add_argument("--max-diff-deg", type=float, default=1.0, help="same, for the rotation")
    p.add_argument("--report", type=Path, help="report folder (default: OUT's name + -report)")


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="compare what the cameras see with their calibration",
                       description="Belt plane drift (mm, deg), depth fill rate and (with "
                       "--board) board reprojection against thresholds; exit 0 pass, 1 fail.")
    p.add_argument("--config", type=Path, required=True, help="the node's config YAML")
    p.add_argument("--board", type=_board, help="also check the reprojection of this board")
    p.add_argument("--max-drift-mm", type=float, default=5.0)
    p.add_argument("--max-tilt-deg", type=float, default=1.0)
    p.add_argument("--min-fill-rate", type=float, default=None,
                   help="depth fill limit in the inspection region (default: 0.7, or the "
                   "fill rate the calibration accepted less 0.1 when that is lower)")
    p.add_argument("--max-board-rms", type=float, default=1.0)
    p.add_argument("--report", type=Path,
                   help="report folder (default: calibration-check-report beside the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-calibrate", description="Calibrate the conveyor-vision cameras and check "
        "their calibration. Every command writes a report folder (summary.yaml/.json + PNGs).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_intrinsics(sub)
    _add_belt(sub)
    _add_extrinsics(sub)
    _add_check(sub)
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "intrinsics": run_intrinsics, "belt": run_belt, "extrinsics": run_extrinsics,
    "check": run_check,
}


def _dispatch(args: argparse.Namespace) -> int:
    return _COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the problem
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    try:
        return _dispatch(args)
    except Refused as exc:
        print(f"edge-calibrate {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (CalibrationInputError, BoardSpecError, CalibrationError, ConfigError, SourceError,
            ValueError, OSError) as exc:
        print(f"edge-calibrate {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"edge-calibrate {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: a message, not a traceback
        log.debug("calibrate.crash", exc_info=True)
        print(f"edge-calibrate {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(please report this with the command line)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
