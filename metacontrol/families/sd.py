"""Stable Diffusion 1.x / 2.x: a UNet and one CLIP text encoder, whose last hidden state is the conditioning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

from metacontrol.families.base import Embeds, UNetFamily, token_ids

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from metacontrol.models.base import BaseModel, Encoders


class StableDiffusion(UNetFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"
    text_encoders = (("text_encoder", "CLIPTextModel", "tokenizer"),)

    def encode_prompts(self, encoders: Encoders, prompts: list[str]) -> Embeds:
        ids = token_ids(encoders.tokenizer, prompts, encoders.text_encoder.device)
        return {"text_embeds": encoders.text_encoder(ids)[0]}

    def pipeline_embeds(self, pipe: Any, prompts: list[str], guidance_scale: float) -> Embeds:
        embeds, negative = pipe.encode_prompt(prompts, pipe._execution_device, 1, guidance_scale > 1)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def pipeline(self, base: BaseModel, scheduler: Any, controlnet: ControlNetModel | None) -> StableDiffusionPipeline:
        parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.denoiser,
                     scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if controlnet is None:
            return StableDiffusionPipeline(**parts)
        return StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
