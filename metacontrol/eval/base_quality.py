"""Quality of a base model on the synthetic world: VAE reconstruction and prompt following.

Prompt following is read off generated images with the world's own palette: the wall colour is the
palette colour nearest the median of the top rows (above any object), the main object's colour is
the most frequent palette colour among pixels that are neither wall nor floor colour. The same
reader applied to the ground-truth images gives its own accuracy, reported beside it as a reference.
"""

from __future__ import annotations

import numpy as np

from metacontrol.data.datasets import SPLIT_SEED_OFFSETS
from metacontrol.eval.metrics import psnr
from metacontrol.models.base import BaseModel
from metacontrol.pipelines import base_pipeline, generate, vae_roundtrip
from metacontrol.world import COLOURS, Scene, SceneWorld, WorldConfig

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], np.float32)
WALL_ROWS = 0.2  # the top fifth of the image is wall above every object in the world


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into PALETTE_NAMES of the nearest palette colour, per pixel (..., 3) -> (...)."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    dist = ((flat[:, None, :] - PALETTE[None]) ** 2).sum(-1)
    return dist.argmin(1).reshape(pixels.shape[:-1])


def read_colours(image: np.ndarray) -> tuple[str, str]:
    """(wall colour, main object colour) as read from an image."""
    h = image.shape[0]
    wall = int(nearest_colour(np.median(image[: max(1, int(h * WALL_ROWS))].reshape(-1, 3), axis=0)[None])[0])
    floor = int(nearest_colour(np.median(image[-max(1, h // 16):].reshape(-1, 3), axis=0)[None])[0])
    labels = nearest_colour(image)
    counts = np.bincount(labels.ravel(), minlength=len(PALETTE_NAMES))
    counts[[wall, floor]] = 0
    return PALETTE_NAMES[wall], PALETTE_NAMES[int(counts.argmax())]


def held_out_scenes(world: WorldConfig, n: int) -> list[Scene]:
    generator = SceneWorld(world)
    return [generator.sample(SPLIT_SEED_OFFSETS["test"] + i) for i in range(n)]


def vae_psnr(base: BaseModel, scenes: list[Scene]) -> float:
    """Mean PSNR (dB) of VAE reconstructions (posterior mode) of held-out images."""
    images = np.stack([s.image for s in scenes])
    recon = vae_roundtrip(base, images)
    return float(np.mean([psnr(r, i) for r, i in zip(recon, images)]))


def prompt_following(images: np.ndarray, scenes: list[Scene]) -> dict[str, float]:
    """Fractions of images whose wall colour and main-object colour match the caption's."""
    wall_hits, main_hits, main_total = 0, 0, 0
    for image, scene in zip(images, scenes):
        wall, main = read_colours(image)
        wall_hits += wall == scene.wall_colour
        if scene.main_object is not None:
            main_total += 1
            main_hits += main == scene.main_object.colour
    return {"background_colour_accuracy": wall_hits / len(scenes), "main_object_colour_accuracy": main_hits / max(main_total, 1)}


def base_model_quality(base: BaseModel, world: WorldConfig, num_samples: int = 48, seed: int = 0,
                       steps: int = 20) -> dict[str, float]:
    """VAE PSNR, prompt following of generations, and the colour reader's accuracy on the ground truth."""
    scenes = held_out_scenes(world, num_samples)
    pipe = base_pipeline(base)
    generated = generate(pipe, [s.caption for s in scenes], None, seed, steps,
                         size=(world.resolution, world.resolution))
    reference = prompt_following(np.stack([s.image for s in scenes]), scenes)
    return {
        "vae_psnr_db": vae_psnr(base, scenes),
        **prompt_following(generated, scenes),
        **{f"reader_on_ground_truth/{k}": v for k, v in reference.items()},
        "num_samples": num_samples,
    }
