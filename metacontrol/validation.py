"""Validation grids during training: condition | generated | ground truth, one row per sample, with its prompt."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from metacontrol.config import MetaTrainConfig
from metacontrol.data.pools import TaskData, synthetic_pools
from metacontrol.models.base import BaseModel
from metacontrol.pipelines import controlnet_pipeline, generate
from metacontrol.visual import save_grid

logger = logging.getLogger(__name__)


def validation_samples(cfg: MetaTrainConfig, data: dict[str, TaskData]
                       ) -> dict[str, tuple[list[np.ndarray], list[str], list[np.ndarray]]]:
    """Per task: held-out (val split) condition maps, captions and ground-truth images; the first samples of real data."""
    n = cfg.num_validation_images
    if cfg.data.source == "synthetic":
        pools = synthetic_pools(cfg.data.world, cfg.data.tasks, n, "val", show_progress=False)
        data = dict(pools)
    out = {}
    for task, task_data in data.items():
        batch = task_data.item_tensors(range(min(n, len(task_data))))
        maps = (batch["conditioning_pixel_values"] * 255).round().byte().permute(0, 2, 3, 1).numpy()
        truths = ((batch["pixel_values"] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        out[task] = (list(maps), list(batch["caption"]), list(truths))
    return out


def log_validation(cfg: MetaTrainConfig, base: BaseModel, controlnet: torch.nn.Module, accelerator: Accelerator,
                   step: int, data: dict[str, TaskData]) -> Path | None:
    """Main process generates and saves the grid; the others wait (no collective inside: no deadlock)."""
    path = None
    if accelerator.is_main_process:
        was_training = controlnet.training
        controlnet.eval()
        pipe = controlnet_pipeline(base, controlnet)
        rows, labels, prompts = [], [], []
        for task, (maps, captions, truths) in validation_samples(cfg, data).items():
            images = generate(pipe, captions, maps, seed=cfg.seed, steps=cfg.validation_inference_steps)
            rows += [list(sample) for sample in zip(maps, images, truths)]
            labels += [task] * len(maps)
            prompts += captions
        path = save_grid(Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png", rows, labels,
                         ["condition", "generated", "ground truth"], row_captions=prompts)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                from PIL import Image
                tracker.writer.add_image("validation", np.asarray(Image.open(path)), step, dataformats="HWC")
        logger.info("validation grid: %s", path)
        controlnet.train(was_training)
    accelerator.wait_for_everyone()
    return path
