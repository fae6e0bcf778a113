"""The ControlNet training loss, as diffusers' ``train_controlnet*.py`` scripts compute it for the base's family
(``metacontrol/families``), with explicit RNG.

Noise, timesteps and VAE posterior samples come from a ``torch.Generator`` seeded by the caller, so
a batch's loss is a pure function of (weights, batch, seed): the basis of bit-exact resume and of
the multi-process == single-process guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from diffusers import ControlNetModel

from metacontrol.config_loader import ConfigError
from metacontrol.families import Embeds
from metacontrol.models.base import BaseModel


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss: the run stops, naming where, and the last good checkpoint stays as it was."""


def check_finite(loss: torch.Tensor, where: str) -> torch.Tensor:
    """``loss``, or a ``NonFiniteLossError`` naming ``where`` (step, task, sample indices) if it is NaN/inf.

    The one NaN check of every training loop. Under several processes it is raised inside
    ``run.agreed``, which tells the others, so none waits forever in the next collective.
    """
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} at {where}; the run stopped and the last checkpoint is kept")
    return loss


class ControlNetObjective:
    """The training loss of the frozen denoiser steered by the ControlNet being trained: the family's (epsilon or v
    prediction for UNets, flow matching for SD3 and Flux), on latents sampled from the VAE posterior.

    ``autocast`` is a factory of autocast contexts (``accelerator.autocast``), entered per forward pass.
    """

    def __init__(self, base: BaseModel, controlnet: ControlNetModel, weight_dtype: torch.dtype = torch.float32,
                 autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        self.base = base
        self.controlnet = controlnet
        self.weight_dtype = weight_dtype
        self.autocast = autocast
        self.device = next(controlnet.parameters()).device
        self.scaling_factor = float(base.vae.config.scaling_factor)
        self.shift_factor = base.vae.config.get("shift_factor")  # SD3's and Flux's VAEs: latents are shifted first

    def _context(self) -> AbstractContextManager:
        return self.autocast() if self.autocast is not None else nullcontext()

    def _scaled(self, sample: torch.Tensor) -> torch.Tensor:
        return (sample if self.shift_factor is None else sample - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def latents_and_text(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, Embeds]:
        """Sampled, scaled latents and the family's prompt encodings, in the weight dtype; precomputed ones in the
        batch are used as they are."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(self.device)
            latents = self._scaled(mean.to(self.device) + std.to(self.device) * eps)
        else:
            pixels = batch["pixel_values"].to(self.device, self.base.vae.dtype)
            dist = self.base.vae.encode(pixels).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(self.device)
            latents = self._scaled(dist.mean.float() + dist.std.float() * eps)
        if "text_embeds" in batch:
            embeds = {key: batch[key].to(self.device) for key in self.base.family.text_keys}
        elif self.base.text_modules:
            embeds = self.base.encode_prompts(list(batch["caption"]))
        else:
            raise ConfigError("free_text_encoders: a batch without cached prompt encodings, and the text encoders "
                              "are gone; this source needs free_text_encoders: false")
        return latents.to(self.weight_dtype), {key: value.to(self.weight_dtype) for key, value in embeds.items()}

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The family's training loss of ``batch`` (``ModelFamily.loss``), every random draw from ``generator``."""
        latents, embeds = self.latents_and_text(batch, generator)
        cond = batch["conditioning_pixel_values"].to(self.device, self.weight_dtype)
        return self.base.family.loss(self.base, self.controlnet, latents, embeds, cond, generator, self.weight_dtype,
                                     self._context())
