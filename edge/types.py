"""Values that flow between pipeline stages.

Geometry conventions (used everywhere, including `calibration/` output):

* Units are millimetres and milliseconds unless a name says otherwise.
* The belt frame: origin on the belt surface at the centre of the inspection
  region, +x along the direction of travel, +y across the belt (to the left
  when looking downstream), +z up, away from the belt.
* Camera frames follow OpenCV: +x right in the image, +y down, +z forward.
* A `Pose` maps camera coordinates to belt coordinates:
  ``p_belt = rotation @ p_cam + translation_mm``.
* Colour images are BGR uint8 (OpenCV's order); depth images are uint16 with
  `depth_scale_m` metres per unit (0.001: one unit is one millimetre).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, SupportsFloat

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Mapping

FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]
U8Array = npt.NDArray[np.uint8]
U16Array = npt.NDArray[np.uint16]
BoolArray = npt.NDArray[np.bool_]
I32Array = npt.NDArray[np.int32]


Distortion = tuple[float, float, float, float, float]
Box3 = tuple[float, float, float]


def distortion(values: Iterable[SupportsFloat]) -> Distortion:
    """Brown-Conrady k1, k2, p1, p2, k3 from the first five of `values` (missing: 0)."""
    c = [float(v) for v in values][:5]
    c += [0.0] * (5 - len(c))
    return (c[0], c[1], c[2], c[3], c[4])


def box3(values: Iterable[SupportsFloat]) -> Box3:
    """A 3-D box's length, width and height (mm) from exactly three numbers."""
    x, y, z = (float(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True, slots=True)
class Intrinsics:
    """Pinhole intrinsics with Brown-Conrady distortion (OpenCV's 5 coefficients)."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    coeffs: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def matrix(self) -> FloatArray:
        return np.array(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64
        )

    def scaled(self, factor: float) -> Intrinsics:
        """Intrinsics of the image resized by `factor` (e.g. 0.5 after 2x decimation)."""
        return Intrinsics(
            width=round(self.width * factor),
            height=round(self.height * factor),
            fx=self.fx * factor,
            fy=self.fy * factor,
            cx=(self.cx + 0.5) * factor - 0.5,
            cy=(self.cy + 0.5) * factor - 0.5,
            coeffs=self.coeffs,
        )


@dataclass(frozen=True, slots=True)
class Pose:
    """Rigid transform from camera coordinates to belt coordinates (mm)."""

    rotation: FloatArray  # 3x3, orthonormal
    translation_mm: FloatArray  # (3,)

    @staticmethod
    def identity() -> Pose:
        return Pose(np.eye(3), np.zeros(3))

    @staticmethod
    def look_at(eye_mm: FloatArray, target_mm: FloatArray, up: FloatArray | None = None) -> Pose:
        """Pose of a camera at `eye_mm` looking at `target_mm` (belt frame).

        `up` is the belt-frame direction that appears towards the top of the
        image; by default the direction of travel (+x) for a top-down camera.
        """
        eye = np.asarray(eye_mm, dtype=np.float64)
        z = np.asarray(target_mm, dtype=np.float64) - eye
        z /= np.linalg.norm(z)
        up_vec = np.array([1.0, 0.0, 0.0]) if up is None else np.asarray(up, dtype=np.float64)
        if abs(float(np.dot(up_vec, z))) > 0.99:
            up_vec = np.array([0.0, 1.0, 0.0])
        y = -(up_vec - np.dot(up_vec, z) * z)  # image +y points down
        y /= np.linalg.norm(y)
        x = np.cross(y, z)
        rotation = np.stack([x, y, z], axis=1)
        return Pose(rotation, eye)

    def matrix(self) -> FloatArray:
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation_mm
        return m

    def inverse(self) -> Pose:
        r_t = self.rotation.T
        return Pose(r_t, -r_t @ self.translation_mm)

    def apply(self, points: FloatArray) -> FloatArray:
        """Transform (..., 3) points."""
        return points @ self.rotation.T + self.translation_mm

    def compose(self, other: Pose) -> Pose:
        """self ∘ other: first `other`, then `self`."""
        return Pose(self.rotation @ other.rotation,
                    self.rotation @ other.translation_mm + self.translation_mm)


class DamageType(enum.Enum):
    CRUSH = "crush"
    TEAR = "tear"
    HOLE = "hole"
    SPILL = "spill"
    DECONSTRUCTION = "deconstruction"
    BROKEN_SET = "broken_set"


#: Damage types the supervised classifier predicts (broken sets are the gallery's job).
CLASSIFIER_DAMAGE_TYPES: tuple[DamageType, ...] = (
    DamageType.CRUSH,
    DamageType.TEAR,
    DamageType.HOLE,
    DamageType.SPILL,
    DamageType.DECONSTRUCTION,
)


class Decision(enum.Enum):
    PASS = "pass"
    SIDELINE = "sideline"


class Reason(enum.Enum):
    DAMAGE = "damage"
    ANOMALY = "anomaly"
    GEOMETRY = "geometry"
    TIMEOUT = "timeout"
    NOT_SEEN = "not_seen"
    UNANNOUNCED = "unannounced"
    MERGED = "merged"
    NO_GALLERY = "no_gallery"
    NO_DEPTH = "no_depth"
    VIEWS_MISSING = "views_missing"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    OUT_OF_DISTRIBUTION = "out_of_distribution"


@dataclass(frozen=True, slots=True)
class ItemTruth:
    """Synthetic ground truth for one item (absent on real cameras)."""

    item_id: str
    product_id: str
    damage: DamageType | None
    box_mm: tuple[float, float, float]  # length (along x), width, height
    confounder: bool = False  # carries a damage-like print on intact packaging
    severity: Literal["subtle", "moderate", "severe"] | None = None  # damaged items only
    damage_size_mm: float | None = None  # extent of the damage (`edge.sim.world.Damage`)
    damage_depth_mm: float | None = None  # its depth or height (dent, hole, flap, contents)
    print_style: str | None = None  # confounders: which damage-like print


@dataclass(frozen=True, slots=True)
class FrameTruth:
    """Synthetic ground truth for one frame of one camera."""

    labels: npt.NDArray[np.uint16]  # 0 = belt, k = items[k - 1]
    damage_mask: BoolArray  # pixels showing damage (incl. spills on the belt)
    items: tuple[ItemTruth, ...]
    centres_mm: tuple[tuple[float, float, float], ...]  # box centre in the belt frame, per item
    yaws_rad: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Frame:
    """One aligned RGB-D frame of one camera."""

    camera_id: str
    index: int
    timestamp_ms: float  # capture time on the node's clock domain (see sources)
    color: U8Array  # (H, W, 3) BGR
    depth: U16Array  # (H, W), aligned to colour; 0 = invalid
    depth_scale_m: float
    intrinsics: Intrinsics
    truth: FrameTruth | None = None


@dataclass(frozen=True, slots=True)
class FrameSet:
    """Frames of all cameras taken at (about) the same time."""

    timestamp_ms: float
    frames: Mapping[str, Frame]
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Announcement:
    """An induct event from the sortation controller."""

    item_id: str
    product_id: str
    induct_time_ms: float  # wall clock (ms since epoch) at the induct point
    belt_position_mm: float | None = None
    received_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class ItemCrop:
    """An item rectified to its canonical pose, ready for the models.

    `color` is BGR uint8 (S, S, 3); `height_mm` is the height above the belt
    plane, float32 (S, S), 0 where unknown; `mask` marks the item's pixels.
    The long side of the item's footprint lies along the image's x axis.
    """

    camera_id: str
    color: U8Array
    height_mm: F32Array
    mask: BoolArray
    has_depth: bool = True
    truth_damage: BoolArray | None = None  # synthetic ground truth: damaged pixels in the crop


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """Everything the node knows about one physical item, handed to inference."""

    track_id: int
    item_id: str
    product_id: str | None
    first_seen_ms: float
    captured_ms: float  # timestamp of the frameset the crops come from
    deadline_ms: float  # when the item reaches the divert point
    box_mm: tuple[float, float, float]  # measured length, width, height
    centre_mm: tuple[float, float]  # belt-frame x, y at `captured_ms`
    crops: Mapping[str, ItemCrop]
    views_missing: tuple[str, ...] = ()
    merged: bool = False
    unannounced: bool = False
    truth: ItemTruth | None = None


@dataclass(frozen=True, slots=True)
class DamageFinding:
    type: DamageType
    probability: float
    box_px: tuple[int, int, int, int] | None = None  # x, y, w, h in the crop


@dataclass(frozen=True, slots=True)
class Scores:
    damage: float  # classifier probability of any damage
    anomaly: float | None  # gallery anomaly score (None: no gallery)
    geometry: float | None  # normalized dimension deficit (None: no depth)
    fused: float
    per_type: Mapping[str, float] = field(default_factory=dict)
    #: out-of-distribution score: 1 or more means unlike every parcel the models know
    #: (None: the models have no out-of-distribution outputs)
    ood: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision about one announced or seen item."""

    item_id: str
    product_id: str | None
    decision: Decision
    reasons: tuple[Reason, ...]
    scores: Scores | None
    threshold_version: str
    model_versions: Mapping[str, str]
    findings: tuple[DamageFinding, ...]
    captured_ms: float | None
    decided_ms: float
    deadline_ms: float
    late: bool = False
    fail_safe: bool = False
    snapshot_id: str | None = None
    anomaly_map: F32Array | None = None  # for snapshots; never published
    anomaly_camera: str | None = None  # the view `anomaly_map` belongs to; never published


FeedbackKind = Literal["confirmed_damage", "false_positive", "packaging_changed"]


@dataclass(frozen=True, slots=True)
class Feedback:
    """What people downstream learned about an item (from `…/feedback`)."""

    item_id: str
    kind: FeedbackKind
    product_id: str | None
    received_ms: float  # when the node got it (node clock, ms since epoch)
    note: str | None = None
