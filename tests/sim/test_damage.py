"""Damage across the severity spectrum: labelled in millimetres, drawn as labelled."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge.catalogue import load_catalogue
from edge.config import Config, ConfigError, load_config
from edge.sim.conveyor import SyntheticConveyor
from edge.sim.render import SceneRenderer, add_sensor_noise
from edge.sim.world import DAMAGE_RANGES, SceneItem
from edge.types import DamageType


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(None)


def _world(cfg: Config, **kw: object) -> SyntheticConveyor:
    syn = dataclasses.replace(cfg.synthetic, **kw)  # type: ignore[arg-type]
    return SyntheticConveyor(syn, cfg.belt, cfg.cameras, load_catalogue(), start_ms=0.0)


def _first(world: SyntheticConveyor, kind: DamageType) -> SceneItem:
    """The first single (not multipack) item with damage of `kind`."""
    for i in range(500):
        item = world.schedule.item(i)
        if item.damage is not None and item.damage.type is kind and item.product.units == 1:
            return item
    raise AssertionError(f"no {kind} in 500 items")


def test_severity_mix_and_physical_ranges(cfg: Config) -> None:
    """Damaged items follow the severity mix; subtle and moderate damage lie in their labelled
    millimetre ranges (subtle dents 3-10 mm deep, tears 10-30 mm, holes under 10 mm across,
    stains under 30 mm); broken sets are always severe."""
    world = _world(cfg, seed=3, damage_rate=1.0, severity_mix=(0.4, 0.35, 0.25))
    items = [world.schedule.item(i) for i in range(600)]
    graded = [it for it in items if it.damage and it.damage.type is not DamageType.BROKEN_SET]
    shares = {s: sum(it.damage.severity == s for it in graded if it.damage) / len(graded)
              for s in ("subtle", "moderate", "severe")}
    assert shares == pytest.approx({"subtle": 0.4, "moderate": 0.35, "severe": 0.25}, abs=0.07)
    for it in items:
        dmg = it.damage
        assert dmg is not None
        assert it.truth.severity == dmg.severity
        assert (it.truth.damage_size_mm, it.truth.damage_depth_mm) == (dmg.size_mm, dmg.depth_mm)
        if dmg.type is DamageType.BROKEN_SET:
            assert dmg.severity == "severe"
            continue
        if dmg.severity == "severe":
            continue
        (lo, hi), depth = DAMAGE_RANGES[dmg.type][dmg.severity]
        assert lo <= dmg.size_mm <= hi, dmg
        if depth is not None and dmg.type is not DamageType.CRUSH:
            assert depth[0] <= dmg.depth_mm <= depth[1], dmg
    subtle = {(it.damage.type, it.damage.severity): it.damage for it in items
              if it.damage and it.damage.severity == "subtle"}
    crush = subtle[(DamageType.CRUSH, "subtle")]
    assert 3.0 <= crush.depth_mm <= 10.0
    assert 10.0 <= subtle[(DamageType.TEAR, "subtle")].size_mm <= 30.0
    assert subtle[(DamageType.HOLE, "subtle")].size_mm < 10.0
    assert subtle[(DamageType.SPILL, "subtle")].size_mm < 30.0


def test_severity_mix_is_checked(cfg: Config) -> None:
    """A mix that is not three shares >= 0 is refused, naming the key."""
    for mix in ((0.5, 0.5), (0.0, 0.0, 0.0), (1.0, -1.0, 1.0)):
        with pytest.raises(ConfigError, match=r"synthetic\.severity_mix"):
            _world(cfg, severity_mix=mix)


def test_subtle_dent_shows_its_labelled_depth(cfg: Config) -> None:
    """A subtle dent's depth change in the rendered depth, against the same item rendered
    intact, is its labelled 3-10 mm: exactly before noise, within a millimetre through the
    camera's stereo noise."""
    world = _world(cfg, seed=5, damage_rate=1.0, severity_mix=(1.0, 0.0, 0.0))
    item = _first(world, DamageType.CRUSH)
    assert item.damage is not None
    label = item.damage.depth_mm
    assert 3.0 <= label <= 10.0
    rig = world._rigs["top"]
    dented = SceneRenderer().render(rig, [(item, 0.0)])
    intact = SceneRenderer().render(rig, [(dataclasses.replace(item, damage=None), 0.0)])
    change = dented.depth_mm - intact.depth_mm
    assert float(change.max()) == pytest.approx(label, rel=0.03)
    assert float(change.min()) > -0.01  # a dent only goes down
    core = change > 0.8 * label
    assert core.sum() > 20
    noisy = [add_sensor_noise(v, rig, np.random.default_rng(1), 0)[1].astype(np.float64)
             for v in (dented, intact)]
    valid = core & (noisy[0] > 0) & (noisy[1] > 0)
    seen = float(np.median((noisy[0] - noisy[1])[valid]))
    assert seen == pytest.approx(float(np.median(change[valid])), abs=1.0)


def test_damage_mask_covers_the_drawn_tear(cfg: Config) -> None:
    """Every pixel a subtle tear changes is in the damage mask, the mask hardly reaches
    beyond it, and a 1-3 cm tear is a thin mark of a few pixels."""
    world = _world(cfg, seed=5, damage_rate=1.0, severity_mix=(1.0, 0.0, 0.0))
    item = _first(world, DamageType.TEAR)
    assert item.damage is not None
    for cam in world.camera_ids:
        rig = world._rigs[cam]
        torn = SceneRenderer().render(rig, [(item, 0.0)])
        intact = SceneRenderer().render(rig, [(dataclasses.replace(item, damage=None), 0.0)])
        drawn = (np.any(torn.color != intact.color, axis=2)
                 | (np.abs(torn.depth_mm - intact.depth_mm) > 0.01))
        assert drawn.sum() > 5, cam
        assert not (drawn & ~torn.damage).any(), cam
        assert torn.damage.sum() <= 1.5 * drawn.sum() + 10, cam
        assert not intact.damage.any()
        rows, cols = np.nonzero(drawn)
        extent_px = int(max(np.ptp(rows), np.ptp(cols))) + 1
        mm_per_px = rig.plane.pixel_size_mm(item.dims_mm[2])
        assert extent_px * mm_per_px <= item.damage.size_mm + 8.0, cam
        assert drawn.sum() / extent_px <= 6.0, cam  # a line a few pixels wide, not a blob


def test_nuisances_keep_frames_deterministic(cfg: Config) -> None:
    """With the line's nuisances on, frame k still has the same bytes in any render order,
    and they change what the camera sees (colour and depth) but not the ground truth labels."""
    a = _world(cfg, seed=7, nuisance=1.0, damage_rate=0.5)
    b = _world(cfg, seed=7, nuisance=1.0, damage_rate=0.5)
    plain = _world(cfg, seed=7, damage_rate=0.5)
    k = 150
    fa = a.render("top", k)
    b.render("top", k + 7)
    b.render("angled", k)
    fb = b.render("top", k)
    assert fa.color.tobytes() == fb.color.tobytes()
    assert fa.depth.tobytes() == fb.depth.tobytes()
    fp = plain.render("top", k)
    assert fa.truth is not None
    assert fp.truth is not None
    assert np.array_equal(fa.truth.labels, fp.truth.labels)
    assert np.abs(fa.color.astype(int) - fp.color.astype(int)).mean() > 2.0
    assert (fa.depth == 0).sum() != (fp.depth == 0).sum()
