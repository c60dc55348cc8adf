"""Tying tracks to the controller's induct announcements by expected arrival time."""

from __future__ import annotations

import pytest

from edge.config import BeltConfig, ItemsConfig
from edge.perception.induct import InductAssociator
from edge.types import Announcement

BELT = BeltConfig(speed_mps=1.0, induct_to_camera_m=2.0, camera_to_divert_m=3.0)
T0 = 1_700_000_000_000.0


def _assoc(seen: list[tuple[str, float]] | None = None) -> InductAssociator:
    cb = (lambda i, t: seen.append((i, t))) if seen is not None else None
    return InductAssociator(BELT, ItemsConfig(association_tolerance_ms=300.0), on_seen=cb)


def test_announced_item_is_claimed_by_expected_arrival_and_reported_seen() -> None:
    """Inducted at T0, 2 m at 1 m/s: seen at x=100 mm at T0+2100 ms, it is that item."""
    seen: list[tuple[str, float]] = []
    a = _assoc(seen)
    a.announce(Announcement("A1", "P-BOX-S", T0))
    a.announce(Announcement("A2", "P-BOX-S", T0 + 600.0))
    got = a.claim(100.0, T0 + 2100.0, (0.0, 200.0), merged=False, seen_ms=T0 + 2100.0)
    assert [g.item_id for g in got] == ["A1"]
    assert seen == [("A1", T0 + 2100.0)]
    assert [p.item_id for p in a.pending()] == ["A2"]


def test_belt_position_in_the_announcement_shortens_the_trip() -> None:
    """An induct reported 500 mm downstream of the induct point arrives 500 ms earlier."""
    a = _assoc()
    ann = Announcement("B1", "P", T0, belt_position_mm=500.0)
    assert a.expected_arrival_ms(ann) == pytest.approx(T0 + 1500.0)


def test_an_announced_items_divert_deadline_counts_its_position_and_the_belt_speed() -> None:
    """5 m from induct to divert at 1 m/s; an item reported 500 mm downstream is due 500 ms
    sooner, and at 2 m/s everything is due in half the time. (The node's fail-safe deadline
    used to ignore the position: the fail-safe came after the item had passed the divert.)"""
    a = _assoc()
    assert a.divert_deadline_ms(Announcement("D1", "P", T0)) == pytest.approx(T0 + 5000.0)
    ahead = Announcement("D2", "P", T0, belt_position_mm=500.0)
    assert a.divert_deadline_ms(ahead) == pytest.approx(T0 + 4500.0)
    a.set_speed(2.0)
    assert a.divert_deadline_ms(ahead) == pytest.approx(T0 + 2250.0)


def test_item_outside_the_tolerance_is_unannounced() -> None:
    """A track 500 ms off every announcement (tolerance 300 ms) gets no ID."""
    a = _assoc()
    a.announce(Announcement("A1", "P", T0))
    assert a.claim(0.0, T0 + 2500.0, (-100.0, 100.0), merged=False, seen_ms=0.0) == []
    assert a.unannounced == 1
    assert a.generated_id(7, T0).startswith("unannounced-")


def test_a_stolen_announcement_does_not_shift_the_following_ids() -> None:
    """If a track's nearest announcement was already taken, it is unannounced rather than
    taking the next item's ID (which would shift every later ID by one)."""
    a = _assoc()
    for i in range(3):
        a.announce(Announcement(f"A{i}", "P", T0 + 250.0 * i))
    assert [g.item_id for g in a.claim(0.0, T0 + 2000.0, (-1.0, 1.0), merged=False,
                                       seen_ms=0.0)] == ["A0"]
    # A duplicate track of item A0 (e.g. a fragment) must not take A1.
    assert a.claim(0.0, T0 + 2010.0, (-1.0, 1.0), merged=False, seen_ms=0.0) == []
    assert [g.item_id for g in a.claim(0.0, T0 + 2250.0, (-1.0, 1.0), merged=False,
                                       seen_ms=0.0)] == ["A1"]


def test_merged_track_claims_every_announcement_inside_its_footprint() -> None:
    """Two touching items (centres 250 mm apart) seen as one blob: both IDs are claimed."""
    a = _assoc()
    a.announce(Announcement("A1", "P", T0))
    a.announce(Announcement("A2", "P", T0 - 250.0))  # 250 mm ahead of A1 on the belt
    a.announce(Announcement("A3", "P", T0 + 900.0))
    t = T0 + 2000.0  # A1's centre at x=0, A2's at x=250
    got = a.claim(125.0, t, (-120.0, 370.0), merged=True, seen_ms=t)
    assert sorted(g.item_id for g in got) == ["A1", "A2"]


def test_deadline_is_when_the_item_reaches_the_divert_point() -> None:
    """Seen at x=200 mm at t, 3 m to the divert at 1 m/s: deadline t + 2800 ms."""
    assert _assoc().deadline_ms(200.0, T0) == pytest.approx(T0 + 2800.0)


def test_speed_updates_change_expected_arrivals_and_bad_speeds_are_refused() -> None:
    """An encoder speed of 2 m/s halves the trip; 0 m/s is refused with the value."""
    a = _assoc()
    a.set_speed(2.0)
    assert a.expected_arrival_ms(Announcement("A", "P", T0)) == pytest.approx(T0 + 1000.0)
    with pytest.raises(ValueError, match="0"):
        a.set_speed(0.0)


def test_old_unclaimed_announcements_expire_from_the_open_list() -> None:
    """An announcement whose item never appeared is dropped (the deadline scheduler owns it)."""
    a = _assoc()
    a.announce(Announcement("GONE", "P", T0))
    a.claim(0.0, T0 + 60_000.0, (-1.0, 1.0), merged=False, seen_ms=0.0)
    assert a.pending() == []
    assert a.expired == 1
