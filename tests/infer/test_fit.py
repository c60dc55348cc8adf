"""Fitting: nominal-quantile thresholds, AUROC, logistic fusion (numpy only)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.infer.fit import (
    ScoreTable,
    fit_fusion,
    fit_thresholds,
    fused_scores,
    logistic_regression,
    nominal_quantile,
    roc_auc,
)
from edge.infer.fusion import COMBOS
from edge.infer.manifest import TensorSpec

scores_st = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300)


@settings(max_examples=80, deadline=None)
@given(scores_st, st.floats(0.0, 0.2))
def test_threshold_never_sidelines_more_nominal_items_than_allowed(values: list[float],
                                                                   fpr: float) -> None:
    """At the fitted threshold at most floor(fpr * n) nominal items score >= t."""
    s = np.array(values)
    damaged = np.zeros(len(s), bool)
    t = nominal_quantile(s, damaged, fpr)
    assert int((s >= t).sum()) <= int(np.floor(fpr * len(s)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.booleans()), min_size=2,
                max_size=60))
def test_auroc_equals_pairwise_probability(pairs: list[tuple[float, bool]]) -> None:
    """AUROC is P(score of a positive > score of a negative) with ties counting half."""
    s = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        assert np.isnan(roc_auc(s, y))
        return
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
    assert abs(roc_auc(s, y) - brute / (len(pos) * len(neg))) < 1e-9


def _table(rng: np.random.Generator, n: int = 600) -> ScoreTable:
    damaged = rng.random(n) < 0.3
    damage = np.clip(np.where(damaged, rng.beta(5, 2, n), rng.beta(1, 8, n)), 1e-4, 1 - 1e-4)
    anomaly = np.where(damaged, rng.normal(1.0, 0.1, n), rng.normal(0.6, 0.1, n))
    anomaly[::7] = np.nan  # some products without a gallery
    geometry = np.where(damaged, rng.uniform(0, 0.5, n), rng.uniform(0, 0.05, n))
    types = tuple("crush" if d else None for d in damaged)
    return ScoreTable(damage, anomaly, geometry, damaged, types, np.zeros(n, bool))


def test_fusion_beats_each_input_and_thresholds_cover_every_combo() -> None:
    """Fitted fusion separates better than the classifier alone; one threshold per combo."""
    table = _table(np.random.default_rng(0))
    fusion = fit_fusion(table)
    full = fused_scores(table, fusion, "full")
    assert roc_auc(full, table.damaged) >= roc_auc(table.damage, table.damaged)
    th = fit_thresholds(table, fusion, 0.01, version="v1")
    assert set(th.fused) == set(COMBOS)
    assert th.version == "fpr0.01-v1"
    nominal = ~table.damaged
    assert float((full[nominal] >= th.fused["full"]).mean()) <= 0.01


def test_logistic_regression_finds_the_separating_direction() -> None:
    """On data where feature 1 decides the label, its weight is large and positive."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 2))
    y = x[:, 0] + 0.1 * rng.normal(size=400) > 0
    w = logistic_regression(x, y)
    assert w[1] > 3 * abs(w[2])


@given(st.lists(st.one_of(st.integers(1, 512), st.none(), st.text(min_size=1, max_size=5)),
                max_size=5))
def test_tensor_spec_matches_symbolic_batch_only(shape: list[int | str | None]) -> None:
    """A spec ('batch', 3) matches any batch but exactly 3 channels; rank must agree."""
    spec = TensorSpec("x", ("batch", 3), "float32")
    expected = len(shape) == 2 and (not isinstance(shape[1], int) or shape[1] == 3)
    assert spec.matches(shape) == expected
