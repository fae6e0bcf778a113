"""Bootstrap intervals, paired differences, steps to threshold and AUC against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metacontrol.eval.statistics import (
    Interval,
    Resampler,
    area_under_curve,
    curve_intervals,
    mean_curve,
    paired_difference,
    steps_to_threshold,
    summarise,
)

STEPS = [0, 25, 50, 100, 200]


def test_area_under_curve_by_hand():
    # trapezoids 0-25: 0.1 * 25, 25-50: 0.3 * 25, 50-100: 0.5 * 50 -> 35 over 100 steps = 0.35
    assert area_under_curve(np.array([0.0, 0.2, 0.4, 0.6, 0.8]), STEPS, 100) == pytest.approx(0.35)
    assert area_under_curve(np.full(5, 0.7), STEPS, 200) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="budget 150"):
        area_under_curve(np.zeros(5), STEPS, 150)


def test_steps_to_threshold_by_hand():
    curve = np.array([0.1, 0.29, 0.31, 0.2, 0.6])
    assert steps_to_threshold(curve, STEPS, 0.3) == 50  # the first crossing, even if it falls back
    assert steps_to_threshold(curve, STEPS, 0.05) == 0
    assert math.isinf(steps_to_threshold(curve, STEPS, 0.7))


def test_constant_scores_give_a_zero_width_interval():
    scores = np.broadcast_to(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), (3, 48, 5)).copy()
    r = Resampler.draw(3, 48, resamples=200)
    for k, point in enumerate(curve_intervals(scores, r)):
        assert point == Interval(pytest.approx(0.1 * (k + 1)), pytest.approx(0.1 * (k + 1)), pytest.approx(0.1 * (k + 1)))


def test_interval_width_matches_the_standard_error():
    """One seed: the scene bootstrap's 95% interval is about mean +- 1.96 sigma / sqrt(n)."""
    rng = np.random.default_rng(1)
    scores = rng.normal(0.5, 0.2, (1, 400, 1))
    point = curve_intervals(scores, Resampler.draw(1, 400, resamples=4000))[0]
    se = scores.std() / math.sqrt(400)
    assert point.estimate == pytest.approx(scores.mean())
    assert point.high - point.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert point.low < scores.mean() < point.high


def test_paired_difference_removes_shared_scene_noise():
    """B = A + 0.05 on every sample: the paired interval is exactly 0.05, though each curve's is wide."""
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, (3, 48, 5))
    b = a + 0.05
    r = Resampler.draw(3, 48, resamples=500)
    diff = paired_difference(b, a, STEPS, 100, r)
    for point in diff.points:
        assert point.low == pytest.approx(0.05) and point.high == pytest.approx(0.05)
    assert diff.auc.estimate == pytest.approx(0.05)
    assert diff.points[0].excludes_zero()
    wide = curve_intervals(a, r)[0]
    assert wide.high - wide.low > 0.1


def test_nan_samples_are_skipped_and_summary_reports_not_reached():
    scores = np.zeros((2, 4, 5))
    scores[:, :, 1:] = [0.1, 0.2, 0.4, 0.6]
    scores[:, 0, :] = np.nan  # a scene where the metric does not apply (no figure)
    assert mean_curve(scores) == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.6])
    summary = summarise(scores, STEPS, [0.3, 0.9], 100, Resampler.draw(2, 4, resamples=100))
    assert summary.steps_to[0.3] == Interval(100.0, 100.0, 100.0)
    assert math.isinf(summary.steps_to[0.9].estimate)
    assert summary.steps_to[0.9].format(0) == "none [none, none]"
    assert summary.auc.estimate == pytest.approx((0.05 * 25 + 0.15 * 25 + 0.3 * 50) / 100)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="seeds=3, scenes=48"):
        Resampler.draw(3, 48).curves(np.zeros((2, 48, 5)))
