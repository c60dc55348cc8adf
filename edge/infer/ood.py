"""Out of distribution: is this input a parcel like the ones the models know?

The damage models learned from rendered parcels; on anything else (a room, a person,
an empty belt, goods of a kind never seen) their score means nothing. Two measured
signals from the embedding model decide it, per view:

- `parcel`: the log of the ImageNet head's summed probability of packaging classes
  (carton, crate, envelope, mailbag, packet, plastic bag): a parcel-ness prior that
  knows real photographs, which the training renders do not cover;
- `novelty`: the squared Mahalanobis distance of the pooled features to the training
  crops, which knows the rendered domain the classifier was trained on.

A view is out of distribution when both say so: it is not parcel-like *and* far from
the training crops. The score is the smaller of the two ratios to their limits, so
1 or more means both limits are passed; an item is scored by its most familiar view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class OodError(ValueError):
    """The manifest's `ood` section is malformed."""


@dataclass(frozen=True, slots=True)
class OodRule:
    parcel_min_logprob: float  # below this (log probability, < 0) a view is not parcel-like
    novelty_max: float  # above this squared distance a view is far from the training crops

    @staticmethod
    def from_mapping(raw: Mapping[str, Any] | None) -> OodRule | None:
        if raw is None:
            return None
        try:
            rule = OodRule(float(raw["parcel_min_logprob"]), float(raw["novelty_max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise OodError(f"ood section of the manifest: {exc!r}; expected "
                           "parcel_min_logprob (< 0) and novelty_max (> 0)") from None
        if not (rule.parcel_min_logprob < 0 < rule.novelty_max):
            raise OodError("ood section of the manifest: parcel_min_logprob must be < 0 and "
                           "novelty_max > 0")
        return rule

    def view_score(self, parcel_logprob: float, novelty: float) -> float:
        """>= 1: this view is out of distribution (NaN inputs give NaN)."""
        not_parcel = parcel_logprob / self.parcel_min_logprob  # both negative
        far = novelty / self.novelty_max
        return min(not_parcel, far) if not (math.isnan(not_parcel) or math.isnan(far)) \
            else math.nan

    def item_score(self, views: Sequence[tuple[float, float]]) -> float | None:
        """The item's score: that of its most familiar view (None without views)."""
        scores = [self.view_score(p, n) for p, n in views]
        if not scores:
            return None
        if any(math.isnan(s) for s in scores):
            return math.nan
        return min(scores)


def is_out_of_distribution(score: float | None) -> bool:
    """Only a readable score of 1 or more: an unreadable (NaN) one is a model fault, which
    the verdict policy treats as an error, never as an input the models cannot judge."""
    return score is not None and score >= 1.0


def is_unreadable(score: float | None) -> bool:
    return score is not None and math.isnan(score)
