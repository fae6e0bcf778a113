"""Zero-/few-shot evaluation: generate under a condition, re-annotate, compare, normalise.

For each condition, a fixed held-out set is generated with fixed seeds, scheduler, steps and guidance:
synthetic test scenes (ground truth known exactly) or the user's photos (``photo_eval_sets``: the first
``num_samples`` of any training source, prepared sets included). Every generated image is scored by
- *condition fidelity* (``Condition.fidelity_metric``, the ControlNet++ protocol): the condition's own
  annotator re-run on the generated image and compared with the same annotator on the ground truth:
  Canny F1, HED/scribble/lineart SSIM, depth RMSE, normal angular error (degrees), pose PCK@0.1 of
  OpenPose's keypoints (the annotators that need weights run when ``annotators`` is given); on synthetic
  scenes also the world's exact analysis (``layout_miou``: are the objects where the condition put them);
- *image agreement with the ground truth*: SSIM, PSNR, edge F1;
- *what the condition constrains* (``Condition.control_metrics``): edge F1 for edge maps; for layout
  maps (depth, normal, seg) the objects' own-colour IoU and boundary F1 against the world's exact
  masks; for pose the figure's own-colour IoU in its box. None depends on the colours the base
  model chose, which are the text's job, not the ControlNet's. Photos have no such ground truth: there
  the control metric is the fidelity metric.
A *floor* (the base model without ControlNet, same seeds) and a *ceiling* (the ground truth
through the VAE: the best this base model can show) normalise each control metric, whichever way it
improves; the control score is their mean (0 = floor, 1 = ceiling). Per sample it is left unclipped, so
that means and bootstrap intervals over samples are exact linear functions of the metrics; the set's
score is that mean clipped to [0, 1].

It runs where the base model is (any device, the UNet in the weight dtype). Under several processes
(``accelerator``) batch ``b`` is generated and scored by process ``b % num_processes`` and the results
gathered in order; image ``i`` is seeded ``seed + i`` wherever it is made, so they equal one process's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import ControlNetModel

from metacontrol.conditions import AnnotatorUnavailable, get_condition
from metacontrol.config import SourceConfig
from metacontrol.config_loader import ConfigError, check
from metacontrol.data.datasets import SPLIT_SEED_OFFSETS
from metacontrol.data.pools import batch_images, synthetic_pools
from metacontrol.eval.metrics import (
    boundary_f1,
    canny_edges,
    edge_f1,
    figure_iou,
    layout_miou,
    normal_angular_error,
    pck,
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
from metacontrol.processes import agreed
from metacontrol.world import Scene, WorldConfig

Scores = dict[str, np.ndarray]  # metric -> one value per sample of an eval set
T = TypeVar("T")
LOWER_IS_BETTER = frozenset({"depth_rmse", "normal_angle"})  # errors; every other metric is a score
PCK_THRESHOLD = 0.1  # a keypoint is correct within this fraction of the image's longer side (PCK@0.1)


@dataclass
class EvalSet:
    """The held-out samples of one condition: input maps, prompts and ground truth (scenes: synthetic only)."""

    condition: str
    maps: list[np.ndarray]
    captions: list[str]
    images: list[np.ndarray]
    scenes: list[Scene]
    # the condition's annotator on each ground-truth image, computed once for floor, ceiling and checkpoints
    references: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def control_metrics(self) -> tuple[str, ...]:
        """What the control score averages: on scenes the condition's exact ones, on photos its fidelity."""
        condition = get_condition(self.condition)
        return condition.control_metrics if self.scenes else (condition.fidelity_metric,)  # type: ignore[return-value]

    def reference(self, index: int, annotate: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        if index not in self.references:
            self.references[index] = annotate(self.images[index])
        return self.references[index]


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
    annotators: str | None = None  # controlnet-aux weights (folder or Hub id) for the detectors that need them
    clip_model: str | None = None  # a CLIP folder or Hub id (e.g. openai/clip-vit-large-patch14): adds clip_score

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


def photo_eval_sets(conditions: list[str], source: SourceConfig, resolution: int, settings: EvalSettings,
                    base: BaseModel) -> dict[str, EvalSet]:
    """The first ``num_samples`` examples of a real source per condition: maps (annotated, or the source's own),
    photos and captions. A condition no annotator can re-annotate cannot be scored on photos: one line says so."""
    from metacontrol.data.sources import load_task_data  # the data stack: only photo evaluations need it

    for condition in conditions:
        if get_condition(condition).fidelity_metric is None:
            raise ConfigError(f"conditions: {condition!r} has no controlnet-aux annotator to re-run on generated "
                              "images, so photos cannot score it; evaluate it on the synthetic world")
    source = replace(source, annotators=source.annotators or settings.annotators)
    data = load_task_data(source, conditions, resolution, base, cache="none", cache_dir=None, show_progress=False)
    out = {}
    for condition, task_data in data.items():
        batch = task_data.item_tensors(range(min(settings.num_samples, len(task_data))))
        maps, images = batch_images(batch)
        out[condition] = EvalSet(condition, maps, list(batch["caption"]), images, [])
    return out


def held_out_sets(conditions: list[str], world: WorldConfig, data: SourceConfig, resolution: int | None,
                  settings: EvalSettings, base: BaseModel) -> dict[str, EvalSet]:
    """The evaluation's held-out samples: synthetic test scenes of ``world`` (``data.source: synthetic``), else
    the first ``settings.num_samples`` photos of ``data`` at ``resolution`` (null: the world's)."""
    if data.source == "synthetic":
        return synthetic_eval_sets(conditions, world, settings)
    return photo_eval_sets(conditions, data, resolution or world.resolution, settings, base)


def check_held_out_source(data: SourceConfig) -> None:
    """At config load: the synthetic scenes of an evaluation are set by its ``world.*``, not ``data.world``."""
    check(data.world == SourceConfig().world, "data.world", data.world,
          "unset: evaluation's synthetic scenes are set by world.*")


def fidelity(eval_set: EvalSet, index: int, generated: np.ndarray, annotators: str | None,
             device: str | None = None) -> dict[str, float]:
    """The condition's annotator on a generated image vs on its ground truth, by the condition's fidelity metric
    (nothing when its annotator cannot run: no annotator, or weights not given)."""
    cond = get_condition(eval_set.condition)
    metric = cond.fidelity_metric
    if metric == "canny_f1":
        return {metric: edge_f1(canny_edges(generated), eval_set.maps[index])}
    if metric is None or cond.annotator is None or (cond.annotator.needs_weights and annotators is None):
        return {}
    try:
        if metric == "pose_pck":
            truth = eval_set.reference(index, lambda image: cond.keypoints(image, annotators, device))  # type: ignore[attr-defined]
            found = cond.keypoints(generated, annotators, device)  # type: ignore[attr-defined]
            return {metric: pck(found, truth, PCK_THRESHOLD * max(generated.shape[:2]))}
        pred = cond.annotate(generated, annotators, device)
        ref = eval_set.reference(index, lambda image: cond.annotate(image, annotators, device))
    except AnnotatorUnavailable:
        return {}
    if metric == "depth_rmse":
        return {metric: rmse(pred.astype(np.float64) / 255, ref.astype(np.float64) / 255)}
    if metric == "normal_angle":
        return {metric: normal_angular_error(pred, ref)}
    return {metric: ssim(pred, ref)}


@dataclass
class ClipScorer:
    """Image-text agreement as the CLIP score (Hessel et al., 2021; torchmetrics' definition): 100 x the cosine of
    the image's and the caption's CLIP embeddings, floored at 0. Independent of the condition: the text's job."""

    model: Any
    processor: Any

    @classmethod
    def load(cls, location: str, device: str) -> ClipScorer:
        from transformers import AutoProcessor, CLIPModel

        from metacontrol.models.base import load_failure, local_folder

        folder = local_folder(location, "settings.clip_model: CLIP folder")
        source = str(folder) if folder is not None else location
        try:
            return cls(CLIPModel.from_pretrained(source).to(device).eval(), AutoProcessor.from_pretrained(source))
        except OSError as err:
            raise ConfigError(f"settings.clip_model: cannot load {location}: {load_failure(err)}") from None

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        inputs = self.processor(text=captions, images=list(images), return_tensors="pt", padding=True, truncation=True)
        out = self.model(**inputs.to(self.model.device))  # image_embeds, text_embeds: projected, unit length
        cosine = (out.image_embeds * out.text_embeds).sum(-1).float().cpu().numpy()
        return np.maximum(100.0 * cosine, 0.0)


def score_samples(eval_set: EvalSet, generated: np.ndarray, annotators: str | None, rows: range | None = None,
                  device: str | None = None, clip: ClipScorer | None = None) -> Scores:
    """Every metric of every generated sample (nan where a metric does not apply, e.g. no figure); ``generated[k]``
    is sample ``rows[k]`` of the set (default: all, in order)."""
    rows = rows if rows is not None else range(len(generated))
    scored = []
    for i, image in zip(rows, generated):
        truth = eval_set.images[i]
        row = {
            "edge_f1": edge_f1(canny_edges(image), canny_edges(truth)),
            "ssim": ssim(image, truth),
            "psnr": psnr(image, truth),
            **fidelity(eval_set, i, image, annotators, device),
        }
        if eval_set.scenes:
            scene = eval_set.scenes[i]
            row.update(layout_miou=layout_miou(image, scene), region_iou=region_iou(image, scene),
                       boundary_f1=boundary_f1(image, scene), figure_iou=figure_iou(image, scene))
        scored.append(row)
    scores = {key: np.array([r[key] for r in scored], np.float64) for key in scored[0]}
    if clip is not None:
        scores["clip_score"] = clip(generated, [eval_set.captions[i] for i in rows]).astype(np.float64)
    return scores


def mean_scores(scores: Scores) -> dict[str, float]:
    """Mean of each metric over the samples where it applies (nan if it applies to none)."""
    return {key: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for key, v in scores.items()}


def normalised_control(scores: Scores, floor: dict[str, float], ceiling: dict[str, float],
                       metrics: tuple[str, ...]) -> np.ndarray:
    """Per sample, the mean over ``metrics`` of (value - floor) / (ceiling - floor), unclipped.

    Floor and ceiling are set means. The ratio reads the same for errors (``LOWER_IS_BETTER``: the ceiling
    is below the floor): 0 at the floor, 1 at the ceiling. A metric whose ceiling does not beat its floor
    has nothing to normalise by and is left out; a sample where a metric is nan (no figure to judge)
    averages the rest; nothing left -> nan.
    """
    n = len(next(iter(scores.values())))

    def gain(m: str) -> float:
        return (floor[m] - ceiling[m]) if m in LOWER_IS_BETTER else (ceiling[m] - floor[m])

    parts = [(scores[m] - floor[m]) / (ceiling[m] - floor[m]) for m in metrics if m in scores and gain(m) > 1e-9]
    if not parts:
        return np.full(n, np.nan)
    stacked = np.stack(parts)
    valid = np.isfinite(stacked)
    counts = valid.sum(axis=0)
    total = np.where(valid, stacked, 0.0).sum(axis=0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


@dataclass
class Evaluator:
    """Generates and scores; the floor and ceiling are computed once and shared by all checkpoints.

    ``accelerator``: split the work across its processes (see the module docstring); None: all here."""

    base: BaseModel
    eval_sets: dict[str, EvalSet]
    settings: EvalSettings = field(default_factory=EvalSettings)
    accelerator: Accelerator | None = None
    _floor: dict[str, Scores] = field(default_factory=dict, init=False)
    _ceiling: dict[str, Scores] = field(default_factory=dict, init=False)
    clip: ClipScorer | None = field(default=None, init=False)  # from settings.clip_model

    def __post_init__(self) -> None:
        # oneDNN's convolutions run about 1.25x faster on the CPU in channels-last layout (same images
        # to within one grey level); evaluation owns the frozen base it is given.
        self.base.denoiser.to(memory_format=torch.channels_last)
        clip_model = self.settings.clip_model
        self.clip = ClipScorer.load(clip_model, self.device) if clip_model is not None else None

    @property
    def device(self) -> str:
        return str(self.base.denoiser.device)

    def _over_batches(self, condition: str, work: Callable[[range], T]) -> list[T]:
        """``work(rows)`` for each batch of the set, batch ``b`` on process ``b % num_processes``; every process
        gets the results of all batches, in order. A failure on one stops all (``agreed``), before the gather."""
        n, size = len(self.eval_sets[condition].captions), self.settings.batch_size
        batches = [range(start, min(start + size, n)) for start in range(0, n, size)]
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return [work(rows) for rows in batches]
        mine: list[tuple[int, T]] = []
        with agreed(acc, f"the evaluation of {condition}"):
            mine = [(b, work(rows)) for b, rows in enumerate(batches) if b % acc.num_processes == acc.process_index]
        return [part for _, part in sorted(gather_object(mine), key=lambda item: item[0])]

    def _pipe(self, controlnet: ControlNetModel | None) -> Any:
        if controlnet is None:
            return base_pipeline(self.base, self.settings.scheduler)
        controlnet = controlnet.to(self.base.denoiser.device, memory_format=torch.channels_last)
        return controlnet_pipeline(self.base, controlnet, self.settings.scheduler)

    def _generate(self, pipe: Any, condition: str, rows: range) -> np.ndarray:
        """Samples ``rows`` of the set, image ``i`` seeded ``seed + i``."""
        s, eval_set = self.settings, self.eval_sets[condition]
        captions = [eval_set.captions[i] for i in rows]
        maps = [eval_set.maps[i] for i in rows] if getattr(pipe, "controlnet", None) is not None else None
        size = eval_set.maps[0].shape[:2]
        return generate(pipe, captions, maps, s.seed + rows.start, s.num_inference_steps, s.guidance_scale,
                        size=size, batch_size=s.batch_size)

    def generate(self, controlnet: ControlNetModel | None, condition: str) -> np.ndarray:
        pipe = self._pipe(controlnet)
        return np.concatenate(self._over_batches(condition, lambda rows: self._generate(pipe, condition, rows)))

    def _scored(self, condition: str, make_images: Callable[[range], np.ndarray]) -> tuple[Scores, np.ndarray]:
        """Images of every sample and their scores, made and scored batch by batch (split across processes)."""
        eval_set = self.eval_sets[condition]

        def work(rows: range) -> tuple[np.ndarray, Scores]:
            images = make_images(rows)
            return images, score_samples(eval_set, images, self.settings.annotators, rows, self.device, self.clip)

        parts = self._over_batches(condition, work)
        scores = {key: np.concatenate([part[1][key] for part in parts]) for key in parts[0][1]}
        return scores, np.concatenate([part[0] for part in parts])

    def floor_scores(self, condition: str) -> Scores:
        if condition not in self._floor:
            pipe = self._pipe(None)
            self._floor[condition] = self._scored(condition, lambda rows: self._generate(pipe, condition, rows))[0]
        return self._floor[condition]

    def ceiling_scores(self, condition: str) -> Scores:
        if condition not in self._ceiling:
            images = self.eval_sets[condition].images
            self._ceiling[condition] = self._scored(
                condition, lambda rows: vae_roundtrip(self.base, [images[i] for i in rows]))[0]
        return self._ceiling[condition]

    def floor(self, condition: str) -> dict[str, float]:
        return mean_scores(self.floor_scores(condition))

    def ceiling(self, condition: str) -> dict[str, float]:
        return mean_scores(self.ceiling_scores(condition))

    def control_scores(self, condition: str, scores: Scores) -> np.ndarray:
        """Per-sample control score of ``scores`` against this set's floor and ceiling (see ``normalised_control``)."""
        return normalised_control(scores, self.floor(condition), self.ceiling(condition),
                                  self.eval_sets[condition].control_metrics)

    def evaluate_samples(self, controlnet: ControlNetModel, condition: str) -> tuple[Scores, np.ndarray]:
        """Per-sample metrics (with ``control_score``) and the images of one checkpoint on one condition."""
        pipe = self._pipe(controlnet)
        scores, images = self._scored(condition, lambda rows: self._generate(pipe, condition, rows))
        scores["control_score"] = self.control_scores(condition, scores)
        return scores, images

    def evaluate(self, controlnet: ControlNetModel, condition: str) -> tuple[dict[str, float], np.ndarray]:
        """Mean metrics (with ``control_score`` clipped to [0, 1]) and the generated images."""
        scores, images = self.evaluate_samples(controlnet, condition)
        metrics = mean_scores(scores)
        if np.isfinite(metrics["control_score"]):
            metrics["control_score"] = min(max(metrics["control_score"], 0.0), 1.0)
        return metrics, images
