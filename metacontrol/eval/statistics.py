"""Learning-curve statistics with intervals: a claim is a difference between measurements.

A benchmark point is a matrix of per-sample control scores, one row per fine-tuning seed and one
column per evaluation scene, for every step count: ``scores[seed, scene, step]``. Both seeds and
scenes are random draws, so intervals come from a *crossed* bootstrap that resamples seeds and scenes
independently (with replacement) and recomputes the statistic. Comparisons between two
initialisations are *paired*: the same resampled seeds and scenes are applied to both, because both
were fine-tuned with the same seeds and evaluated on the same scenes with the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval (``inf``: not reached within the budget)."""

    estimate: float
    low: float
    high: float

    def format(self, digits: int = 3) -> str:
        return f"{_fmt(self.estimate, digits)} [{_fmt(self.low, digits)}, {_fmt(self.high, digits)}]"

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _fmt(x: float, digits: int) -> str:
    if math.isinf(x):
        return "none"
    return f"{x:.{digits}f}" if digits > 0 else str(int(round(x)))


@dataclass(frozen=True)
class Resampler:
    """Fixed bootstrap draws of seed and scene indices, shared by every statistic so that comparisons pair up."""

    seed_index: np.ndarray  # (resamples, n_seeds)
    scene_index: np.ndarray  # (resamples, n_scenes)

    @classmethod
    def draw(cls, n_seeds: int, n_scenes: int, resamples: int = 2000, seed: int = 0) -> Resampler:
        if n_seeds < 1 or n_scenes < 1 or resamples < 1:
            raise ValueError(f"bootstrap needs >= 1 seed, scene and resample, got {n_seeds}, {n_scenes}, {resamples}")
        rng = np.random.default_rng(seed)
        return cls(rng.integers(0, n_seeds, (resamples, n_seeds)), rng.integers(0, n_scenes, (resamples, n_scenes)))

    def curves(self, scores: np.ndarray) -> np.ndarray:
        """(resamples, steps) mean curves of ``scores[seed, scene, step]`` under each draw (nan samples skipped)."""
        _check_scores(scores, self.seed_index.shape[1], self.scene_index.shape[1])
        picked = scores[self.seed_index[:, :, None], self.scene_index[:, None, :], :]
        return _nanmean(picked, axis=(1, 2))


def _check_scores(scores: np.ndarray, n_seeds: int, n_scenes: int) -> None:
    if scores.ndim != 3 or scores.shape[:2] != (n_seeds, n_scenes):
        raise ValueError(f"scores must be (seeds={n_seeds}, scenes={n_scenes}, steps), got shape {scores.shape}")


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    valid = np.isfinite(x)
    counts = valid.sum(axis=axis)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def _interval(estimate: float, draws: np.ndarray) -> Interval:
    draws = draws[~np.isnan(draws)]  # a draw of only not-applicable samples (e.g. no figure) says nothing
    if len(draws) == 0:
        return Interval(float(estimate), math.nan, math.nan)
    tail = (1 - CONFIDENCE) / 2 * 100
    # "lower"/"higher" pick observed draws, so "not reached" (inf) stays inf instead of turning into nan.
    low = float(np.percentile(draws, tail, method="lower"))
    high = float(np.percentile(draws, 100 - tail, method="higher"))
    return Interval(float(estimate), low, high)


def mean_curve(scores: np.ndarray) -> np.ndarray:
    """The point estimate: the mean over seeds and scenes at every step."""
    return _nanmean(scores, axis=(0, 1))


def curve_intervals(scores: np.ndarray, resampler: Resampler) -> list[Interval]:
    """Mean and interval at every step of ``scores[seed, scene, step]``."""
    draws, estimate = resampler.curves(scores), mean_curve(scores)
    return [_interval(estimate[k], draws[:, k]) for k in range(scores.shape[2])]


def steps_to_threshold(curve: np.ndarray, steps: list[int], threshold: float) -> float:
    """The first step count whose score reaches ``threshold``; ``inf`` when none does within the budget."""
    reached = np.nonzero(np.asarray(curve) >= threshold)[0]
    return float(steps[reached[0]]) if len(reached) else math.inf


def area_under_curve(curve: np.ndarray, steps: list[int], budget: int) -> float:
    """Mean control score over steps 0..``budget`` (trapezoids; ``budget`` must be an evaluated step count)."""
    if budget not in steps or steps[0] != 0:
        raise ValueError(f"budget {budget} must be one of the evaluated steps {steps}, which must start at 0")
    k = steps.index(budget) + 1
    xs, ys = np.asarray(steps[:k], np.float64), np.asarray(curve[:k], np.float64)
    return float(((ys[1:] + ys[:-1]) / 2 * np.diff(xs)).sum() / budget)


@dataclass(frozen=True)
class CurveSummary:
    """Everything the benchmark reports about one initialisation's curve on one condition."""

    points: list[Interval]
    steps_to: dict[float, Interval]  # threshold -> steps to reach it
    auc: Interval


def summarise(scores: np.ndarray, steps: list[int], thresholds: list[float], budget: int,
              resampler: Resampler) -> CurveSummary:
    draws, estimate = resampler.curves(scores), mean_curve(scores)
    steps_to = {
        t: _interval(steps_to_threshold(estimate, steps, t),
                     np.array([steps_to_threshold(d, steps, t) for d in draws]))
        for t in thresholds
    }
    auc = _interval(area_under_curve(estimate, steps, budget),
                    np.array([area_under_curve(d, steps, budget) for d in draws]))
    return CurveSummary(curve_intervals(scores, resampler), steps_to, auc)


@dataclass(frozen=True)
class PairedDifference:
    """A - B at every step and in AUC, each with its paired interval."""

    points: list[Interval]
    auc: Interval


def paired_difference(a: np.ndarray, b: np.ndarray, steps: list[int], budget: int,
                      resampler: Resampler) -> PairedDifference:
    """A - B on the same seeds and scenes, resampled together (nan where either is nan)."""
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {a.shape} and {b.shape}")
    diff = a - b
    draws, estimate = resampler.curves(diff), mean_curve(diff)
    auc = _interval(area_under_curve(estimate, steps, budget),
                    np.array([area_under_curve(d, steps, budget) for d in draws]))
    return PairedDifference([_interval(estimate[k], draws[:, k]) for k in range(len(steps))], auc)
