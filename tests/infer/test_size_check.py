"""The geometry check's top-face depression: dents and holes in millimetres, not noise,
sides, neighbours or missing depth."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.catalogue import load_catalogue
from edge.infer.size_check import geometry_check, surface_dent_mm
from edge.types import ItemCrop

SIZE = 128


def box_crop(top_mm: float, *, tilt: tuple[float, float] = (0.0, 0.0), noise_mm: float = 1.5,
             seed: int = 0) -> ItemCrop:
    """A top-down crop of a box: belt (height 0) around a tilted, noisy top face, with a
    band of side face (what perspective shows) along one edge."""
    rng = np.random.default_rng(seed)
    h = np.zeros((SIZE, SIZE), np.float32)
    mask = np.zeros((SIZE, SIZE), bool)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    face = (slice(20, 108), slice(12, 116))
    plane = top_mm + tilt[0] * (x - SIZE / 2) + tilt[1] * (y - SIZE / 2)
    h[face] = plane[face]
    mask[face] = True
    side = (slice(108, 114), slice(12, 116))  # the side, falling from the top to the belt
    h[side] = np.linspace(top_mm * 0.8, top_mm * 0.1, 6, dtype=np.float32)[:, None]
    mask[side] = True
    h[mask] += rng.normal(0.0, noise_mm, int(mask.sum())).astype(np.float32)
    color = np.full((SIZE, SIZE, 3), 120, np.uint8)
    return ItemCrop("top", color, h, mask)


def dent(crop: ItemCrop, centre: tuple[int, int], radius: int, depth_mm: float) -> None:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    r2 = (y - centre[0]) ** 2 + (x - centre[1]) ** 2
    bowl = depth_mm * np.clip(1.0 - r2 / radius**2, 0.0, None)  # deepest in the middle
    crop.height_mm[:] -= bowl.astype(np.float32)


tilts = st.tuples(st.floats(-0.1, 0.1), st.floats(-0.1, 0.1))


@settings(max_examples=40, deadline=None)
@given(st.floats(30.0, 400.0), tilts, st.integers(0, 2**16))
def test_an_intact_tilted_noisy_top_has_no_dent(top: float, tilt: tuple[float, float],
                                                 seed: int) -> None:
    dent_mm = surface_dent_mm(box_crop(top, tilt=tilt, seed=seed))
    assert dent_mm is not None
    assert dent_mm < 2.5


@settings(max_examples=40, deadline=None)
@given(st.floats(60.0, 400.0), tilts, st.floats(5.0, 40.0), st.integers(6, 16),
       st.integers(0, 2**16))
def test_a_dent_is_measured_in_millimetres(top: float, tilt: tuple[float, float], depth: float,
                                           radius: int, seed: int) -> None:
    crop = box_crop(top, tilt=tilt, seed=seed)
    dent(crop, (60, 64), radius, depth)
    measured = surface_dent_mm(crop)
    assert measured is not None
    # Smoothing takes a little off the bottom of a narrow bowl; noise adds a little.
    assert 0.6 * depth <= measured <= depth + 2.5


def test_a_crushed_edge_between_intact_corners_counts() -> None:
    crop = box_crop(150.0)
    crop.height_mm[20:45, 40:90] -= 30.0  # pushed in from the top edge
    measured = surface_dent_mm(crop)
    assert measured is not None
    assert measured > 20.0


def test_missing_depth_and_a_touching_neighbour_are_not_dents() -> None:
    crop = box_crop(150.0)
    crop.height_mm[50:70, 40:70] = 0.0  # a dropout: no depth, not a hole
    crop.height_mm[20:108, 0:12] = 60.0  # a lower neighbour the mask took in
    crop.mask[20:108, 0:12] = True
    measured = surface_dent_mm(crop)
    assert measured is not None
    assert measured < 2.5


def test_no_depth_gives_no_measurement() -> None:
    crop = box_crop(150.0)
    crop.height_mm[:] = 0.0
    assert surface_dent_mm(crop) is None


def test_the_surface_counts_only_for_models_calibrated_with_it() -> None:
    product = load_catalogue().products[0]
    crop = box_crop(product.dims_mm[2])
    dent(crop, (60, 64), 12, 20.0)
    box = (product.dims_mm[0], product.dims_mm[1], product.dims_mm[2])
    old = geometry_check(box, product, {"top": crop}, {}, 0.0)
    new = geometry_check(box, product, {"top": crop}, {}, 0.0, surface_full_mm=25.0)
    assert old is not None
    assert new is not None
    assert old.surface_deficit == 0.0
    assert old.dent_mm is None
    assert new.dent_mm is not None
    assert new.surface_deficit == new.dent_mm / 25.0
    assert new.score >= new.surface_deficit > 0.5


def test_a_polybag_top_is_not_measured_as_a_plane() -> None:
    """Soft packaging bulges: only rigid tops (boxes, multipacks) are held to a plane."""
    catalogue = load_catalogue()
    bag = next(p for p in catalogue.products if p.packaging == "polybag")
    crop = box_crop(bag.dims_mm[2])
    dent(crop, (60, 64), 12, 20.0)
    box = (bag.dims_mm[0], bag.dims_mm[1], bag.dims_mm[2])
    result = geometry_check(box, bag, {"top": crop}, {}, 0.0, surface_full_mm=25.0)
    assert result is not None
    assert result.dent_mm is None
    assert result.surface_deficit == 0.0


def test_a_gap_down_to_the_belt_is_a_missing_unit_and_a_hole_is_not() -> None:
    """The broken-set evidence takes a depression reaching the belt, not a hole or a dent."""
    multipack = next(p for p in load_catalogue().products if p.packaging == "multipack")
    length, width, height = multipack.dims_mm
    holed, gap = box_crop(height, seed=1), box_crop(height, seed=2)
    dent(holed, (60, 64), 10, 0.5 * height)
    gap.height_mm[40:80, 44:84] = np.float32(2.0)  # a unit's footprint, the belt showing
    results = [geometry_check((length, width, height), multipack, {"top": c}, {}, 0.0,
                              surface_full_mm=25.0) for c in (holed, gap)]
    assert results[0] is not None
    assert results[1] is not None
    assert results[0].surface_deficit > 0.5  # the hole is damage all the same
    assert results[0].set_score < 0.1
    assert results[1].set_score == 1.0
