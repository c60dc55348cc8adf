"""Calibration targets: parsing board specs and their 3-D corner coordinates.

Two kinds of board, written the way an engineer types them on the command line:

* ``chessboard:COLSxROWS:SQUARE_MM`` -- COLS x ROWS counts the *inner* corners
  (where four squares meet), as OpenCV's ``findChessboardCorners`` and ROS's
  ``--size`` do: the common 10 x 7-square board is ``chessboard:9x6:25``.
* ``charuco:COLSxROWS:SQUARE_MM:MARKER_MM:DICT`` -- COLS x ROWS counts the
  *squares*, as ``cv2.aruco.CharucoBoard`` does; DICT is an ArUco dictionary
  name such as ``DICT_4X4_50`` (the ``DICT_`` prefix may be left out).

Board coordinates are millimetres on the board plane (z = 0); the board frame
is the one OpenCV uses for each kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from edge.types import FloatArray

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_MIN_CHESS = 2
_MIN_CHARUCO = 3
_MAX_SIDE = 200


class BoardSpecError(ValueError):
    """A board spec that cannot be used; the message says what to type instead."""


def aruco_dictionary_names() -> tuple[str, ...]:
    """The ArUco dictionary names this OpenCV knows (e.g. ``DICT_4X4_50``)."""
    return tuple(sorted(n for n in dir(cv2.aruco) if n.startswith("DICT_") and n.isupper()))


@dataclass(frozen=True, slots=True)
class BoardSpec:
    """A calibration board: kind, grid size, square (and marker) size in mm."""

    kind: Literal["chessboard", "charuco"]
    cols: int
    rows: int
    square_mm: float
    marker_mm: float | None = None
    dictionary: str | None = None

    def __str__(self) -> str:
        size = f"{self.cols}x{self.rows}:{_fmt(self.square_mm)}"
        if self.kind == "chessboard":
            return f"chessboard:{size}"
        return f"charuco:{size}:{_fmt(self.marker_mm or 0.0)}:{self.dictionary}"

    @property
    def size_mm(self) -> tuple[float, float]:
        """Outer size of the printed pattern (width, height) in mm."""
        if self.kind == "chessboard":
            return ((self.cols + 1) * self.square_mm, (self.rows + 1) * self.square_mm)
        return (self.cols * self.square_mm, self.rows * self.square_mm)

    def object_points(self) -> FloatArray:
        """(N, 3) corner coordinates in mm, in the order the detector returns them."""
        if self.kind == "chessboard":
            grid = np.mgrid[0 : self.cols, 0 : self.rows].T.reshape(-1, 2)
            pts = np.zeros((grid.shape[0], 3))
            pts[:, :2] = grid * self.square_mm
            return pts
        return np.asarray(self.charuco_board().getChessboardCorners(), dtype=np.float64)

    def charuco_board(self) -> Any:
        """The `cv2.aruco.CharucoBoard` of a ChArUco spec."""
        if self.kind != "charuco" or self.dictionary is None or self.marker_mm is None:
            raise BoardSpecError(f"board {self} is not a ChArUco board")
        dictionary = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.dictionary))
        return cv2.aruco.CharucoBoard(
            (self.cols, self.rows), float(self.square_mm), float(self.marker_mm), dictionary
        )


def _fmt(value: float) -> str:
    return repr(float(value)).removesuffix(".0")


def _parse_size(text: str, spec: str, what: str) -> tuple[int, int]:
    m = _SIZE.match(text)
    if not m:
        raise BoardSpecError(
            f"board spec {spec!r}: {text!r} is not COLSxROWS (e.g. 9x6); COLSxROWS counts {what}"
        )
    return int(m.group(1)), int(m.group(2))


def _parse_mm(text: str, spec: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BoardSpecError(
            f"board spec {spec!r}: {name} {text!r} is not a number of mm") from None
    if not np.isfinite(value) or value <= 0.0 or value > 10_000.0:
        raise BoardSpecError(f"board spec {spec!r}: {name} must be > 0 and <= 10000 mm, got {text}")
    return value


def parse_board(spec: str) -> BoardSpec:
    """Parse ``chessboard:9x6:25`` or ``charuco:7x5:30:22:DICT_4X4_50``."""
    parts = [p.strip() for p in spec.split(":")]
    kind = parts[0].lower()
    if kind == "chessboard":
        if len(parts) != 3:
            raise BoardSpecError(
                f"board spec {spec!r}: a chessboard is chessboard:COLSxROWS:SQUARE_MM "
                "(inner corners, square side in mm), e.g. chessboard:9x6:25"
            )
        cols, rows = _parse_size(parts[1], spec, "inner corners")
        if min(cols, rows) < _MIN_CHESS or max(cols, rows) > _MAX_SIDE or cols == rows:
            raise BoardSpecError(
                f"board spec {spec!r}: a chessboard needs 2..{_MAX_SIDE} inner corners per side "
                "and a different count on each side (so its orientation is unambiguous)"
            )
        return BoardSpec("chessboard", cols, rows, _parse_mm(parts[2], spec, "square size"))
    if kind == "charuco":
        return _parse_charuco(spec, parts)
    raise BoardSpecError(
        f"board spec {spec!r}: unknown board kind {parts[0]!r}; use chessboard:COLSxROWS:SQUARE_MM "
        "or charuco:COLSxROWS:SQUARE_MM:MARKER_MM:DICT"
    )


def _parse_charuco(spec: str, parts: list[str]) -> BoardSpec:
    if len(parts) != 5:
        raise BoardSpecError(
            f"board spec {spec!r}: a ChArUco board is "
            "charuco:COLSxROWS:SQUARE_MM:MARKER_MM:DICT (squares, sizes in mm, ArUco "
            "dictionary), e.g. charuco:7x5:30:22:DICT_4X4_50"
        )
    cols, rows = _parse_size(parts[1], spec, "squares")
    if min(cols, rows) < _MIN_CHARUCO or max(cols, rows) > _MAX_SIDE:
        raise BoardSpecError(
            f"board spec {spec!r}: a ChArUco board needs 3..{_MAX_SIDE} squares per side"
        )
    square = _parse_mm(parts[2], spec, "square size")
    marker = _parse_mm(parts[3], spec, "marker size")
    if marker >= square:
        raise BoardSpecError(
            f"board spec {spec!r}: the marker ({_fmt(marker)} mm) must be smaller than the "
            f"square ({_fmt(square)} mm)"
        )
    name = parts[4].upper()
    if not name.startswith("DICT_"):
        name = "DICT_" + name
    known = aruco_dictionary_names()
    if name not in known:
        raise BoardSpecError(
            f"board spec {spec!r}: unknown ArUco dictionary {parts[4]!r}; one of: "
            + ", ".join(known)
        )
    needed = (cols * rows) // 2
    size = int(re.sub(r"^.*_(\d+)$", r"\1", name)) if re.search(r"_\d+$", name) else None
    if size is not None and "X" in name and size < needed:
        raise BoardSpecError(
            f"board spec {spec!r}: {name} has {size} markers but the board needs {needed}; "
            "use a larger dictionary"
        )
    return BoardSpec("charuco", cols, rows, square, marker, name)
