"""Board specs as engineers type them: parsing, round trips and helpful errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from calibration.boards import BoardSpec, BoardSpecError, aruco_dictionary_names, parse_board

sizes_mm = st.floats(min_value=0.5, max_value=500.0, allow_nan=False).map(lambda v: round(v, 3))


@st.composite
def chessboards(draw: st.DrawFn) -> BoardSpec:
    cols = draw(st.integers(2, 40))
    rows = draw(st.integers(2, 40).filter(lambda r: r != cols))
    return BoardSpec("chessboard", cols, rows, draw(sizes_mm))


@st.composite
def charucos(draw: st.DrawFn) -> BoardSpec:
    cols, rows = draw(st.integers(3, 12)), draw(st.integers(3, 12))
    square = draw(sizes_mm.filter(lambda v: v >= 2.0))
    marker = round(square * draw(st.floats(0.2, 0.9)), 3)
    return BoardSpec("charuco", cols, rows, square, marker, "DICT_6X6_1000")


@given(chessboards() | charucos())
def test_spec_round_trips_through_its_text(spec: BoardSpec) -> None:
    """str(spec) is a valid spec that parses back to the same board."""
    assert parse_board(str(spec)) == spec


@given(chessboards())
def test_chessboard_object_points_are_a_grid_of_inner_corners(spec: BoardSpec) -> None:
    """A chessboard yields COLS*ROWS corners, one square apart, starting at the origin."""
    pts = spec.object_points()
    assert pts.shape == (spec.cols * spec.rows, 3)
    assert pts[0].tolist() == [0.0, 0.0, 0.0]
    assert pts[1, 0] == pytest.approx(spec.square_mm)
    assert pts[:, 2].max() == 0.0


@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_a_board_spec_error(text: str) -> None:
    """Any string either parses or raises BoardSpecError (never another exception)."""
    message = ""
    try:
        spec = parse_board(text)
    except BoardSpecError as exc:
        message = str(exc)
    else:
        assert spec.kind in ("chessboard", "charuco")
        return
    assert message.startswith("board spec")


def test_charuco_spec_builds_the_opencv_board() -> None:
    """A ChArUco spec gives an OpenCV board with (cols-1)*(rows-1) chessboard corners."""
    spec = parse_board("charuco:7x5:30:22:4x4_50")
    assert spec.dictionary == "DICT_4X4_50"
    assert spec.object_points().shape == (24, 3)
    assert spec.charuco_board().getChessboardSize() == (7, 5)


@pytest.mark.parametrize(("text", "needle"), [
    ("chessboard:9x6", "chessboard:COLSxROWS:SQUARE_MM"),
    ("chessboard:9by6:25", "COLSxROWS"),
    ("chessboard:6x6:25", "different count"),
    ("chessboard:9x6:-3", "must be > 0"),
    ("chessboard:9x6:abc", "not a number"),
    ("charuco:7x5:30:40:DICT_4X4_50", "must be smaller"),
    ("charuco:7x5:30:22:DICT_9X9_7", "unknown ArUco dictionary"),
    ("charuco:20x20:30:22:DICT_4X4_50", "larger dictionary"),
    ("circles:4x11:20", "unknown board kind"),
])
def test_bad_specs_say_what_to_type(text: str, needle: str) -> None:
    """Each malformed spec is rejected with a message that names the fix."""
    with pytest.raises(BoardSpecError, match=needle):
        parse_board(text)


def test_dictionary_names_come_from_opencv() -> None:
    """The dictionaries offered are the ones this OpenCV build has."""
    assert "DICT_4X4_50" in aruco_dictionary_names()
