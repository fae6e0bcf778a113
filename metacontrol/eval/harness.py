"""Zero-/few-shot evaluation: generate under a condition, re-annotate, compare, normalise.

For each condition, a fixed held-out set (synthetic test split: ground truth known exactly) is
generated with fixed seeds, scheduler, steps and guidance. Every generated image is scored by
- *condition fidelity*: the condition's own annotator re-run on the generated image and compared
  with the same annotator on the ground truth (Canny F1, lineart SSIM; HED/depth/normal with
  controlnet-aux weights when given), and the synthetic world's exact analysis otherwise
  (``layout_miou``: are the objects where the condition put them);
- *image agreement with the ground truth*: SSIM, PSNR, edge F1.
A *floor* (the base model without ControlNet, same seeds) and a *ceiling* (the ground truth
through the VAE: the best this base model can show) normalise edge F1 against the ground truth to a
control score in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionPipeline

from metacontrol.conditions import AnnotatorUnavailable, get_condition
from metacontrol.data.pools import synthetic_pools
from metacontrol.data.world import Scene, WorldConfig
from metacontrol.eval.metrics import canny_edges, control_score, edge_f1, layout_miou, psnr, rmse, ssim
from metacontrol.models.base import BaseModel
from metacontrol.pipelines import GUIDANCE_SCALE, controlnet_pipeline, generate

# The control score is built on edge F1 against the ground-truth image for every condition: object
# boundaries are fixed by the layout any condition encodes, and edges do not depend on whether the
# base model got the *colours* right, which is the text's job, not the ControlNet's.
PRIMARY_METRIC = "edge_f1"


def primary_metric(condition: str) -> str:
    """The metric the control score normalises (the same for every condition; see PRIMARY_METRIC)."""
    return PRIMARY_METRIC


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

    num_samples: int = 8
    seed: int = 1234
    num_inference_steps: int = 20
    guidance_scale: float = GUIDANCE_SCALE
    scheduler: str = "DPMSolverMultistepScheduler"
    split: str = "test"
    annotators: str | None = None


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


def score_images(eval_set: EvalSet, generated: np.ndarray, annotators: str | None) -> dict[str, float]:
    """Mean of every metric over the set's samples."""
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
            row["layout_miou"] = layout_miou(image, eval_set.scenes[i])
        rows.append(row)
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


@dataclass
class Evaluator:
    """Generates and scores; the floor and ceiling are computed once and shared by all checkpoints."""

    base: BaseModel
    eval_sets: dict[str, EvalSet]
    settings: EvalSettings = field(default_factory=EvalSettings)
    _floor: dict[str, dict[str, float]] = field(default_factory=dict, init=False)
    _ceiling: dict[str, dict[str, float]] = field(default_factory=dict, init=False)

    def _scheduler(self):
        return DPMSolverMultistepScheduler.from_config(self.base.noise_scheduler.config)

    def generate(self, controlnet: ControlNetModel | None, condition: str) -> np.ndarray:
        s, eval_set = self.settings, self.eval_sets[condition]
        if controlnet is None:
            pipe = StableDiffusionPipeline(
                vae=self.base.vae, text_encoder=self.base.text_encoder, tokenizer=self.base.tokenizer,
                unet=self.base.unet, scheduler=self._scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            h, w = eval_set.maps[0].shape[:2]
            return generate(pipe, eval_set.captions, None, s.seed, s.num_inference_steps, s.guidance_scale,
                            size=(h, w))
        pipe = controlnet_pipeline(self.base, controlnet)
        return generate(pipe, eval_set.captions, eval_set.maps, s.seed, s.num_inference_steps, s.guidance_scale)

    @torch.no_grad()
    def _vae_roundtrip(self, images: list[np.ndarray]) -> np.ndarray:
        vae = self.base.vae
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    def floor(self, condition: str) -> dict[str, float]:
        if condition not in self._floor:
            self._floor[condition] = score_images(self.eval_sets[condition], self.generate(None, condition),
                                                  self.settings.annotators)
        return self._floor[condition]

    def ceiling(self, condition: str) -> dict[str, float]:
        if condition not in self._ceiling:
            eval_set = self.eval_sets[condition]
            self._ceiling[condition] = score_images(eval_set, self._vae_roundtrip(eval_set.images),
                                                    self.settings.annotators)
        return self._ceiling[condition]

    def evaluate(self, controlnet: ControlNetModel, condition: str) -> tuple[dict[str, float], np.ndarray]:
        """Metrics (with ``control_score``) and the generated images of one checkpoint on one condition."""
        images = self.generate(controlnet, condition)
        metrics = score_images(self.eval_sets[condition], images, self.settings.annotators)
        key = primary_metric(condition)
        floor, ceiling = self.floor(condition)[key], self.ceiling(condition)[key]
        # A ceiling that does not beat the floor leaves nothing to normalise by: reported as nan.
        metrics["control_score"] = control_score(metrics[key], floor, ceiling) if ceiling > floor else float("nan")
        return metrics, images
