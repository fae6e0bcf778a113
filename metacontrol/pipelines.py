"""Generation with the standard diffusers pipelines over an in-memory base model, for validation grids,
evaluation and the base model's quality check; and the VAE round trip (the ceiling of what a ControlNet
can reach through this VAE)."""

from __future__ import annotations

from contextlib import nullcontext

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.schedulers import KarrasDiffusionSchedulers

from metacontrol.families import Embeds, family_of_controlnet
from metacontrol.models.base import BaseModel

GUIDANCE_SCALE = 4.0
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"


def _samples_sd(name: str) -> bool:
    """Whether diffusers exports ``name`` as a scheduler class here (a missing optional dependency leaves a
    placeholder) that feeds the UNet its training timesteps (EDM schedulers feed it log-sigmas instead)."""
    cls = getattr(diffusers, name, None)
    return isinstance(cls, type) and issubclass(cls, SchedulerMixin) and not name.startswith("EDM")


# The samplers of StableDiffusionPipeline (diffusers' KarrasDiffusionSchedulers) that fit an SD-1.x/2.x base here.
SCHEDULERS: tuple[str, ...] = tuple(filter(_samples_sd, KarrasDiffusionSchedulers.__members__))


def base_pipeline(base: BaseModel, scheduler: str = DEFAULT_SCHEDULER) -> DiffusionPipeline:
    """The family's plain pipeline (``StableDiffusionPipeline``...) over the in-memory base model (no reload):
    no control.

    ``scheduler`` (one of ``SCHEDULERS``) is built from the base model's training schedule, so every sampler
    denoises the noise levels the UNet learned.
    """
    return _quiet(base.family.pipeline(base, _scheduler(base, scheduler), None))


def controlnet_pipeline(base: BaseModel, controlnet: torch.nn.Module,
                        scheduler: str = DEFAULT_SCHEDULER) -> DiffusionPipeline:
    """The family's ControlNet pipeline (``StableDiffusionControlNetPipeline``...) over the in-memory base model
    (no reload; ``scheduler`` as in ``base_pipeline``)."""
    return _quiet(base.family.pipeline(base, _scheduler(base, scheduler), controlnet))


def _scheduler(base: BaseModel, name: str) -> SchedulerMixin:
    return base.family.sampler(base, name)


def _quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def vae_roundtrip(base: BaseModel, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) images encoded (posterior mode) and decoded by the base model's VAE."""
    vae = base.vae
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
    out = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(pipe, prompts: list[str], conditions: list[np.ndarray] | None, seed: int, steps: int = 20,
             guidance_scale: float = GUIDANCE_SCALE, size: tuple[int, int] | None = None,
             batch_size: int = 8, prompt_embeds: Embeds | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3). ``conditions`` are uint8 (H, W, 3) maps; None for a plain pipeline.
    ``prompt_embeds``: the prompts encoded (``ModelFamily.pipeline_embeds``), for a pipeline without text encoders.

    Image i has its own generator seeded ``seed + i``, so it does not depend on how prompts are batched.
    """
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    unet_dtype = denoiser.dtype
    # Autocast when any part runs in another dtype than the UNet: an fp32 ControlNet under training, and the fp32
    # text encoder (``BaseModel.freeze`` keeps it so) whose embeddings a bf16/fp16 UNet and ControlNet read.
    parts = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None),
             getattr(pipe, "controlnet", None)]
    mixed = any(part is not None and part.dtype != unet_dtype for part in parts)
    autocast = torch.autocast(pipe.device.type, dtype=unet_dtype) if mixed else nullcontext()
    if conditions is not None:
        size = conditions[0].shape[:2]
        argument = family_of_controlnet(pipe.controlnet).control_image_argument  # image, or control_image
    height, width = size if size is not None else (None, None)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        kwargs = {}
        if conditions is not None:
            maps = np.stack([conditions[i] for i in chunk])
            kwargs[argument] = torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 255.0
        with autocast:
            if prompt_embeds is not None:
                kwargs.update({key: value[chunk.start:chunk.stop] for key, value in prompt_embeds.items()})
            texts = None if prompt_embeds is not None else [prompts[i] for i in chunk]
            out = pipe(texts, num_inference_steps=steps, guidance_scale=guidance_scale,
                       height=height, width=width, output_type="np",
                       generator=[torch.Generator().manual_seed(seed + i) for i in chunk], **kwargs).images
        images.append(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(images)
