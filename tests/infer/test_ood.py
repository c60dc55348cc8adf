"""The out-of-distribution rule: both signals must say 'unlike the training parcels'."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.infer.inspector import rgb_channels
from edge.infer.ood import OodError, OodRule, is_out_of_distribution, is_unreadable

RULE = OodRule(parcel_min_logprob=math.log(0.05), novelty_max=100.0)
logprob = st.floats(min_value=-30.0, max_value=0.0)
novelty = st.floats(min_value=0.0, max_value=1e4)


def test_a_view_is_out_of_distribution_only_when_both_signals_say_so() -> None:
    not_parcel, parcel = math.log(0.001), math.log(0.6)
    assert is_out_of_distribution(RULE.view_score(not_parcel, 500.0))
    assert not is_out_of_distribution(RULE.view_score(parcel, 500.0))  # a real parcel photo
    assert not is_out_of_distribution(RULE.view_score(not_parcel, 20.0))  # a rendered one


@given(st.lists(st.tuples(logprob, novelty), min_size=1, max_size=4))
def test_an_item_is_as_familiar_as_its_most_familiar_view(views: list[tuple[float, float]]
                                                         ) -> None:
    score = RULE.item_score(views)
    assert score is not None
    assert is_out_of_distribution(score) == all(
        is_out_of_distribution(RULE.view_score(p, n)) for p, n in views)


@given(logprob, novelty, st.floats(min_value=0.0, max_value=5.0))
def test_the_score_grows_with_novelty_and_with_less_parcel_likeness(p: float, n: float,
                                                                    more: float) -> None:
    assert RULE.view_score(p, n + more) >= RULE.view_score(p, n)
    assert RULE.view_score(p - more, n) >= RULE.view_score(p, n)


def test_nan_signals_are_unreadable_not_out_of_distribution() -> None:
    score = RULE.item_score([(math.nan, 1.0), (-0.1, 1.0)])
    assert is_unreadable(score)
    assert not is_out_of_distribution(score)
    assert RULE.item_score([]) is None
    assert not is_out_of_distribution(None)


@pytest.mark.parametrize("raw", [{"novelty_max": 3.0}, {"parcel_min_logprob": 0.5,
                                                         "novelty_max": 3.0},
                                 {"parcel_min_logprob": -1.0, "novelty_max": "x"}])
def test_a_malformed_rule_is_refused_with_what_is_expected(raw: dict[str, object]) -> None:
    with pytest.raises(OodError, match="parcel_min_logprob"):
        OodRule.from_mapping(raw)


def test_crops_reach_the_backbone_in_rgb_order() -> None:
    """Cameras give BGR; ImageNet weights expect RGB."""
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 0] = 200  # blue
    out = np.empty((3, 4, 4), np.float32)
    rgb_channels(bgr, 4, out, to_rgb=True)
    assert (out[2] == 200).all()
    assert (out[0] == 0).all()
    rgb_channels(bgr, 4, out, to_rgb=False)
    assert (out[0] == 200).all()
