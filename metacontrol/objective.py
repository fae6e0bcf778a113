"""The ControlNet training loss, as diffusers' ``train_controlnet.py`` computes it, with explicit RNG.

Noise, timesteps and VAE posterior samples come from a ``torch.Generator`` seeded by the caller, so
a batch's loss is a pure function of (weights, batch, seed): the basis of bit-exact resume and of
the multi-process == single-process guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel

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
    """Epsilon (or v) prediction loss of the frozen UNet steered by the ControlNet being trained.

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
        self.prediction_type = base.noise_scheduler.config.prediction_type

    def _context(self) -> AbstractContextManager:
        return self.autocast() if self.autocast is not None else nullcontext()

    @torch.no_grad()
    def latents_and_text(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, Embeds]:
        """Sampled, scaled latents and the family's prompt encodings, in the weight dtype; precomputed ones in the
        batch are used as they are."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(self.device)
            latents = (mean.to(self.device) + std.to(self.device) * eps) * self.scaling_factor
        else:
            pixels = batch["pixel_values"].to(self.device, self.base.vae.dtype)
            dist = self.base.vae.encode(pixels).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(self.device)
            latents = (dist.mean.float() + dist.std.float() * eps) * self.scaling_factor
        if "text_embeds" in batch:
            embeds = {key: batch[key].to(self.device) for key in self.base.family.text_keys}
        else:
            embeds = self.base.encode_prompts(list(batch["caption"]))
        return latents.to(self.weight_dtype), {key: value.to(self.weight_dtype) for key, value in embeds.items()}

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents, embeds = self.latents_and_text(batch, generator)
        text = embeds["text_embeds"]
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(self.device)
        steps = self.base.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (bsz,), generator=generator).to(self.device)
        noisy = self.base.noise_scheduler.add_noise(latents.float(), noise, timesteps).to(self.weight_dtype)
        cond = batch["conditioning_pixel_values"].to(self.device, self.weight_dtype)
        added = self.base.family.added_conditions(embeds, tuple(cond.shape[-2:]), self.weight_dtype)
        with self._context():
            down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=cond,
                                        return_dict=False, **added)
            pred = self.base.unet(
                noisy, timesteps, encoder_hidden_states=text, **added,
                down_block_additional_residuals=[r.to(self.weight_dtype) for r in down],
                mid_block_additional_residual=mid.to(self.weight_dtype),
            ).sample  # fmt: skip
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.base.noise_scheduler.get_velocity(latents.float(), noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        return F.mse_loss(pred.float(), target.float())
