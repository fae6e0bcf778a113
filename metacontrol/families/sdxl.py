"""Stable Diffusion XL: a UNet with ``addition_embed_type="text_time"`` and two CLIP text encoders.

As ``StableDiffusionXLPipeline.encode_prompt`` computes it: the per-token conditioning is both encoders'
penultimate hidden states side by side, and the second encoder's projected pooled output, with the
"time ids" (original size, crop corner, target size), goes to the ControlNet and the UNet as
``added_cond_kwargs``. Training images are resized, never cropped: original = target = the image size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

from metacontrol.families.base import Embeds, UNetFamily, guided_pipeline_embeds, token_ids

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from metacontrol.models.base import BaseModel, Encoders


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    controlnet_pipeline_class = "StableDiffusionXLControlNetPipeline"
    text_encoders = (("text_encoder", "CLIPTextModel", "tokenizer"),
                     ("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"))
    text_keys = ("text_embeds", "pooled_text_embeds")

    def encode_prompts(self, encoders: Encoders, prompts: list[str]) -> Embeds:
        per_token = []
        for tokenizer, encoder in ((encoders.tokenizer, encoders.text_encoder),
                                   (encoders.tokenizer_2, encoders.text_encoder_2)):
            out = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            per_token.append(out.hidden_states[-2])
        return {"text_embeds": torch.cat(per_token, dim=-1), "pooled_text_embeds": out[0]}

    def added_conditions(self, embeds: Embeds, size: tuple[int, int], dtype: torch.dtype) -> dict[str, Any]:
        pooled = embeds["pooled_text_embeds"]
        height, width = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=pooled.device)
        return {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.repeat(len(pooled), 1)}}

    def pipeline_embeds(self, pipe: Any, prompts: list[str], guidance_scale: float) -> Embeds:
        return guided_pipeline_embeds(pipe.encode_prompt(prompts, device=pipe._execution_device,
                                                         do_classifier_free_guidance=guidance_scale > 1))

    def pipeline(self, base: BaseModel, scheduler: Any, controlnet: ControlNetModel | None) -> StableDiffusionXLPipeline:
        parts = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.denoiser, scheduler=scheduler,
                     add_watermarker=False)
        if controlnet is None:
            return StableDiffusionXLPipeline(**parts)
        return StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet)
