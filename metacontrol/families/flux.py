"""Flux.1: a transformer of double and single blocks over packed 2x2 latent patches, CLIP-L (pooled) and T5
(per token), trained by flow matching; guidance is an input when the transformer has ``guidance_embeds``.

As ``FluxPipeline.encode_prompt``: the pooled embedding is CLIP's pooler output, the per-token one T5's last
hidden state; text ids are zeros. The ControlNet is ``FluxControlNetModel.from_transformer`` with diffusers'
defaults (``CONTROLNET_LAYERS`` double, ``CONTROLNET_SINGLE_LAYERS`` single blocks, fewer if the transformer has
fewer); the condition map enters as packed VAE latents, as ``FluxControlNetPipeline`` passes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline

from metacontrol.families.base import Embeds, FlowFamily, token_ids

if TYPE_CHECKING:
    from metacontrol.models.base import BaseModel, Encoders

CONTROLNET_LAYERS, CONTROLNET_SINGLE_LAYERS = 4, 10  # FluxControlNetModel.from_transformer's defaults
T5_TOKENS = 512  # FluxPipeline's max_sequence_length
GUIDANCE = 3.5  # the distilled guidance a training step is conditioned on (FluxPipeline's default)


class Flux(FlowFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    controlnet_pipeline_class = "FluxControlNetPipeline"
    controlnet_class = "FluxControlNetModel"
    denoiser_class = "FluxTransformer2DModel"
    text_encoders = (("text_encoder", "CLIPTextModel", "tokenizer"), ("text_encoder_2", "T5EncoderModel", "tokenizer_2"))
    text_keys = ("text_embeds", "pooled_text_embeds")
    zero_layers = ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")
    compatibility_keys = ("in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim",
                          "num_attention_heads", "attention_head_dim", "guidance_embeds", "axes_dims_rope")

    def encode_prompts(self, encoders: Encoders, prompts: list[str]) -> Embeds:
        clip = encoders.text_encoder(token_ids(encoders.tokenizer, prompts, encoders.text_encoder.device),
                                     output_hidden_states=False).pooler_output
        t5 = encoders.text_encoder_2(token_ids(encoders.tokenizer_2, prompts, encoders.text_encoder_2.device,
                                               T5_TOKENS), output_hidden_states=False)[0]
        return {"text_embeds": t5, "pooled_text_embeds": clip}

    def new_controlnet(self, base: BaseModel) -> FluxControlNetModel:
        config = base.denoiser.config
        return FluxControlNetModel.from_transformer(
            base.denoiser, num_layers=min(CONTROLNET_LAYERS, config.num_layers),
            num_single_layers=min(CONTROLNET_SINGLE_LAYERS, config.num_single_layers),
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)

    def predict(self, base: BaseModel, controlnet: Any, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Embeds, control: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        text, pooled = embeds["text_embeds"], embeds["pooled_text_embeds"]
        common = dict(
            hidden_states=FluxControlNetPipeline._pack_latents(noisy, batch, channels, height, width),
            timestep=timesteps / 1000, encoder_hidden_states=text, pooled_projections=pooled,
            guidance=(torch.full((batch,), GUIDANCE, device=noisy.device, dtype=torch.float32)
                      if base.denoiser.config.guidance_embeds else None),
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=weight_dtype),
            img_ids=FluxControlNetPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device,
                                                                     weight_dtype))
        blocks, singles = controlnet(
            controlnet_cond=FluxControlNetPipeline._pack_latents(control, batch, channels, height, width),
            return_dict=False, **common)
        packed = base.denoiser(
            controlnet_block_samples=[b.to(weight_dtype) for b in blocks],
            controlnet_single_block_samples=None if singles is None else [s.to(weight_dtype) for s in singles],
            return_dict=False, **common)[0]
        factor = base.vae_scale_factor
        return FluxControlNetPipeline._unpack_latents(packed, height * factor, width * factor, factor)

    def pipeline_embeds(self, pipe: Any, prompts: list[str], guidance_scale: float) -> Embeds:
        """Flux is guidance-distilled: ``guidance_scale`` is an input of the transformer, no negative prompt."""
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe._execution_device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pipeline(self, base: BaseModel, scheduler: Any, controlnet: Any) -> FluxPipeline:
        parts = dict(scheduler=scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                     text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, transformer=base.denoiser)
        if controlnet is None:
            return FluxPipeline(**parts)
        return FluxControlNetPipeline(**parts, controlnet=controlnet)
