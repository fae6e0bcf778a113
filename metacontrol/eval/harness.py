"""Zero-/few-shot evaluation: generate under a condition, re-annotate, compare, normalise.

For each condition, a fixed held-out set (synthetic test split: ground truth known exactly) is
generated with fixed seeds, scheduler, steps and guidance. Every generated image is scored by
- *condition fidelity*: the condition's own annotator re-run on the generated image and compared
  with the same annotator on the ground truth (Canny F1, lineart SSIM; HED/depth/normal with
  controlnet-aux weights when given), and the synthetic world's exact analysis otherwise
  (``layout_miou``: are the objects where the condition put them);
- *image agreement with the ground truth*: SSIM, PSNR, edge F1;
- *what the condition constrains* (``Condition.control_metrics``): edge F1 for edge maps; for layout
  maps (depth, normal, seg) the objects' own-colour IoU and boundary F1 against the world's exact
  masks; for pose the figure's own-colour IoU in its box. None depends on the colours the base
  model chose, which are the text's job, not the ControlNet's.
A *floor* (the base model without ControlNet, same seeds) and a *ceiling* (the ground truth
through the VAE: the best this base model can show) normalise each control metric; the control
score is their mean (0 = floor, 1 = ceiling). Per sample it is left unclipped, so that means and
bootstrap intervals over samples are exact linear functions of the metrics; the set's score is
that mean clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import ControlNetModel

from metacontrol.conditions import AnnotatorUnavailable, get_condition
from metacontrol.config_loader import check
from metacontrol.data.datasets import SPLIT_SEED_OFFSETS
from metacontrol.data.pools import synthetic_pools
from metacontrol.eval.metrics import (
    boundary_f1,
    canny_edges,
    edge_f1,
    figure_iou,
    layout_miou,
    psnr,
    region_iou,
    rmse,
    ssim,
)
from metacontrol.models.base import BaseModel
from metacontrol.pipelines import (
    DEFAULT_SCHEDULER,
    GUIDANCE_SCALE,
    SCHEDULERS,
    base_pipeline,
    controlnet_pipeline,
    generate,
    vae_roundtrip,
)
from metacontrol.world import Scene, WorldConfig

Scores = dict[str, np.ndarray]  # metric -> one value per sample of an eval set


def control_metrics(condition: str) -> tuple[str, ...]:
    """The metrics the control score of ``condition`` averages (declared by the condition)."""
    return get_condition(condition).control_metrics


@dataclass
class EvalSet:
    """The held-out samples of one condition: input maps, prompts and ground truth."""

    condition: str
    maps: list[np.ndarray]
    captions: list[str]
    images: list[np.ndarray]
    scenes: list[Scene]


@dataclass
class EvalSettings:
    """Everything that fixes a generation; recorded in every metrics.json."""

    num_samples: int = 48
    seed: int = 1234
    # DPM-Solver++ at 10 steps gives nearly the images of 20 (mean |difference| 1.5 of 255 on the tiny
    # model) in half the time; see BENCHMARKS.md.
    num_inference_steps: int = 10
    guidance_scale: float = GUIDANCE_SCALE
    batch_size: int = 16  # scenes per pipeline call; image i's noise is seeded seed + i whatever the batching
    scheduler: str = DEFAULT_SCHEDULER  # a diffusers scheduler class, built from the base model's noise schedule
    split: str = "test"
    annotators: str | None = None

    def __post_init__(self) -> None:
        # Checked at config load (the loader names them settings.*), not an hour into a benchmark.
        check(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1")
        check(self.scheduler in SCHEDULERS, "scheduler", self.scheduler,
              "a diffusers scheduler class for Stable Diffusion: " + ", ".join(SCHEDULERS))
        check(self.split in SPLIT_SEED_OFFSETS, "split", self.split, "one of " + ", ".join(SPLIT_SEED_OFFSETS))


def synthetic_eval_sets(conditions: list[str], world: WorldConfig, settings: EvalSettings) -> dict[str, EvalSet]:
    """Held-out scenes (shared by all conditions) and each condition's map of them."""
    pools = synthetic_pools(world, conditions, settings.num_samples, settings.split, show_progress=False,
                            keep_scenes=True)
    out = {}
    for condition, pool in pools.items():
        maps = list(pool.conditions.permute(0, 2, 3, 1).numpy())
        images = list(pool.images.permute(0, 2, 3, 1).numpy())
        out[condition] = EvalSet(condition, maps, list(pool.captions), images, list(pool.scenes or []))
    return out


def _reannotation_fidelity(condition: str, generated: np.ndarray, truth: np.ndarray, input_map: np.ndarray,
                           annotators: str | None) -> dict[str, float]:
    """The condition's annotator on the generated image vs on the ground truth (when it can run)."""
    cond = get_condition(condition)
    if condition == "canny":
        return {"canny_f1": edge_f1(canny_edges(generated), input_map)}
    if cond.annotator is None or (cond.annotator.needs_weights and annotators is None):
        return {}
    try:
        pred, ref = cond.annotate(generated, annotators), cond.annotate(truth, annotators)
    except AnnotatorUnavailable:
        return {}
    if condition == "depth":
        return {"depth_rmse": rmse(pred.astype(np.float64) / 255, ref.astype(np.float64) / 255)}
    return {f"{condition}_ssim": ssim(pred, ref)}


def score_samples(eval_set: EvalSet, generated: np.ndarray, annotators: str | None) -> Scores:
    """Every metric of every generated sample (nan where a metric does not apply, e.g. no figure)."""
    rows = []
    for i, image in enumerate(generated):
        truth = eval_set.images[i]
        row = {
            "edge_f1": edge_f1(canny_edges(image), canny_edges(truth)),
            "ssim": ssim(image, truth),
            "psnr": psnr(image, truth),
            **_reannotation_fidelity(eval_set.condition, image, truth, eval_set.maps[i], annotators),
        }
        if eval_set.scenes:
            scene = eval_set.scenes[i]
            row.update(layout_miou=layout_miou(image, scene), region_iou=region_iou(image, scene),
                       boundary_f1=boundary_f1(image, scene), figure_iou=figure_iou(image, scene))
        rows.append(row)
    return {key: np.array([r[key] for r in rows], np.float64) for key in rows[0]}


def mean_scores(scores: Scores) -> dict[str, float]:
    """Mean of each metric over the samples where it applies (nan if it applies to none)."""
    return {key: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for key, v in scores.items()}


def normalised_control(scores: Scores, floor: dict[str, float], ceiling: dict[str, float],
                       metrics: tuple[str, ...]) -> np.ndarray:
    """Per sample, the mean over ``metrics`` of (value - floor) / (ceiling - floor), unclipped.

    Floor and ceiling are set means. A metric whose ceiling does not beat its floor has nothing to
    normalise by and is left out; a sample where a metric is nan (no figure to judge) averages the
    rest; nothing left -> nan.
    """
    n = len(next(iter(scores.values())))
    parts = [(scores[m] - floor[m]) / (ceiling[m] - floor[m]) for m in metrics if ceiling[m] - floor[m] > 1e-9]
    if not parts:
        return np.full(n, np.nan)
    stacked = np.stack(parts)
    valid = np.isfinite(stacked)
    counts = valid.sum(axis=0)
    total = np.where(valid, stacked, 0.0).sum(axis=0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


@dataclass
class Evaluator:
    """Generates and scores; the floor and ceiling are computed once and shared by all checkpoints."""

    base: BaseModel
    eval_sets: dict[str, EvalSet]
    settings: EvalSettings = field(default_factory=EvalSettings)
    _floor: dict[str, Scores] = field(default_factory=dict, init=False)
    _ceiling: dict[str, Scores] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # oneDNN's convolutions run about 1.25x faster on the CPU in channels-last layout (same images
        # to within one grey level); evaluation owns the frozen base it is given.
        self.base.unet.to(memory_format=torch.channels_last)

    def generate(self, controlnet: ControlNetModel | None, condition: str) -> np.ndarray:
        s, eval_set = self.settings, self.eval_sets[condition]
        if controlnet is None:
            pipe = base_pipeline(self.base, s.scheduler)
            h, w = eval_set.maps[0].shape[:2]
            return generate(pipe, eval_set.captions, None, s.seed, s.num_inference_steps, s.guidance_scale,
                            size=(h, w), batch_size=s.batch_size)
        pipe = controlnet_pipeline(self.base, controlnet.to(memory_format=torch.channels_last), s.scheduler)
        return generate(pipe, eval_set.captions, eval_set.maps, s.seed, s.num_inference_steps, s.guidance_scale,
                        batch_size=s.batch_size)

    def floor_scores(self, condition: str) -> Scores:
        if condition not in self._floor:
            self._floor[condition] = score_samples(self.eval_sets[condition], self.generate(None, condition),
                                                   self.settings.annotators)
        return self._floor[condition]

    def ceiling_scores(self, condition: str) -> Scores:
        if condition not in self._ceiling:
            eval_set = self.eval_sets[condition]
            self._ceiling[condition] = score_samples(eval_set, vae_roundtrip(self.base, eval_set.images),
                                                     self.settings.annotators)
        return self._ceiling[condition]

    def floor(self, condition: str) -> dict[str, float]:
        return mean_scores(self.floor_scores(condition))

    def ceiling(self, condition: str) -> dict[str, float]:
        return mean_scores(self.ceiling_scores(condition))

    def control_scores(self, condition: str, scores: Scores) -> np.ndarray:
        """Per-sample control score of ``scores`` against this set's floor and ceiling (see ``normalised_control``)."""
        return normalised_control(scores, self.floor(condition), self.ceiling(condition), control_metrics(condition))

    def evaluate_samples(self, controlnet: ControlNetModel, condition: str) -> tuple[Scores, np.ndarray]:
        """Per-sample metrics (with ``control_score``) and the images of one checkpoint on one condition."""
        images = self.generate(controlnet, condition)
        scores = score_samples(self.eval_sets[condition], images, self.settings.annotators)
        scores["control_score"] = self.control_scores(condition, scores)
        return scores, images

    def evaluate(self, controlnet: ControlNetModel, condition: str) -> tuple[dict[str, float], np.ndarray]:
        """Mean metrics (with ``control_score`` clipped to [0, 1]) and the generated images."""
        scores, images = self.evaluate_samples(controlnet, condition)
        metrics = mean_scores(scores)
        if np.isfinite(metrics["control_score"]):
            metrics["control_score"] = min(max(metrics["control_score"], 0.0), 1.0)
        return metrics, images
