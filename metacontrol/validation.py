"""Validation grids during training: condition | generated | ground truth, one row per sample, with its prompt."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from metacontrol.config import SourceConfig
from metacontrol.data.pools import TaskData, batch_images, synthetic_pools
from metacontrol.families import Embeds
from metacontrol.models.base import BaseModel
from metacontrol.pipelines import GUIDANCE_SCALE, base_pipeline, controlnet_pipeline, generate
from metacontrol.processes import agreed
from metacontrol.visual import save_grid

logger = logging.getLogger(__name__)


@dataclass
class ValidationSamples:
    """One task's validation rows, uint8 (H, W, 3) each: built once, before the loop."""

    maps: list[np.ndarray]
    captions: list[str]
    truths: list[np.ndarray]
    prompt_embeds: Embeds | None = None  # the captions as the pipeline encodes them, once text encoders are gone


GRID_TASKS = 8  # a grid of every one of hundreds of generated tasks would take minutes and be unreadable


def validation_samples(source: SourceConfig, data: dict[str, TaskData], count: int,
                       resolution: int) -> dict[str, ValidationSamples]:
    """Per task (the first ``GRID_TASKS`` of them): held-out (val split) synthetic scenes, or the first ``count``
    samples of real training data."""
    data = dict(list(data.items())[:GRID_TASKS])
    if source.source == "synthetic":
        data = dict(synthetic_pools(source.world_at(resolution), list(data), count, "val", show_progress=False))
    out = {}
    for task, task_data in data.items():
        batch = task_data.item_tensors(range(min(count, len(task_data))))
        maps, truths = batch_images(batch)
        out[task] = ValidationSamples(maps, list(batch["caption"]), truths)
    return out


def drop_text_encoders(base: BaseModel, samples: dict[str, ValidationSamples]) -> None:
    """``free_text_encoders``: encode the validation captions as the family's pipeline does, then let the text
    encoders go. Training reads cached prompt encodings, so nothing needs them afterwards, and their memory (T5-XXL:
    9.5 GB in bf16) is free for training."""
    pipe = base_pipeline(base)
    for task_samples in samples.values():
        task_samples.prompt_embeds = base.family.pipeline_embeds(pipe, task_samples.captions, GUIDANCE_SCALE)
    count = sum(p.numel() for m in base.text_modules for p in m.parameters())
    base.text_encoder = base.text_encoder_2 = base.text_encoder_3 = None
    logger.info("free_text_encoders: the text encoders (%s parameters) are let go; training reads cached prompt "
                "encodings", f"{count:,}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log_validation(accelerator: Accelerator, base: BaseModel, controlnet: torch.nn.Module,
                   samples: dict[str, ValidationSamples], step: int, output_dir: Path, *, seed: int,
                   inference_steps: int) -> Path | None:
    """The main process generates and saves the grid; a failure there stops every process (``agreed``)."""
    path = None
    with agreed(accelerator, f"the validation of step {step}"):
        if accelerator.is_main_process:
            path = _draw_grid(accelerator, base, controlnet, samples, step, output_dir, seed, inference_steps)
    return path


def _draw_grid(accelerator: Accelerator, base: BaseModel, controlnet: torch.nn.Module,
               samples: dict[str, ValidationSamples], step: int, output_dir: Path, seed: int,
               inference_steps: int) -> Path:
    was_training = controlnet.training
    controlnet.eval()
    pipe = controlnet_pipeline(base, controlnet)
    rows, labels, prompts = [], [], []
    for task, task_samples in samples.items():
        images = generate(pipe, task_samples.captions, task_samples.maps, seed=seed, steps=inference_steps,
                          prompt_embeds=task_samples.prompt_embeds)
        rows += [list(sample) for sample in zip(task_samples.maps, images, task_samples.truths)]
        labels += [task] * len(task_samples.maps)
        prompts += task_samples.captions
    path = save_grid(Path(output_dir) / "validation" / f"step-{step:06d}.png", rows, labels,
                     ["condition", "generated", "ground truth"], row_captions=prompts)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            from PIL import Image
            tracker.writer.add_image("validation", np.asarray(Image.open(path)), step, dataformats="HWC")
    logger.info("validation grid: %s", path)
    controlnet.train(was_training)
    return path
