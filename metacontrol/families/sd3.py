"""Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIP text encoders and T5, trained by flow matching.

Prompts are encoded as ``StableDiffusion3Pipeline.encode_prompt`` does: both CLIPs' penultimate hidden states
side by side, zero-padded to T5's width and followed by T5's tokens; the pooled embedding is both CLIPs' pooled
outputs. The ControlNet is ``SD3ControlNetModel.from_transformer`` (its first ``CONTROLNET_LAYERS`` blocks,
fewer if the transformer has fewer; no extra conditioning channels); the condition map and the pooled
projection reach it exactly as ``StableDiffusion3ControlNetPipeline`` passes them (zeros and no VAE shift when its config says
``force_zeros_for_pooled_projection``, as ``from_transformer`` makes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

from metacontrol.families.base import Embeds, FlowFamily, guided_pipeline_embeds, token_ids

if TYPE_CHECKING:
    from metacontrol.models.base import BaseModel, Encoders

CONTROLNET_LAYERS = 12  # diffusers' default (train_controlnet_sd3.py); fewer if the transformer has fewer
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    controlnet_pipeline_class = "StableDiffusion3ControlNetPipeline"
    controlnet_class = "SD3ControlNetModel"
    denoiser_class = "SD3Transformer2DModel"
    text_encoders = (("text_encoder", "CLIPTextModelWithProjection", "tokenizer"),
                     ("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"),
                     ("text_encoder_3", "T5EncoderModel", "tokenizer_3"))
    text_keys = ("text_embeds", "pooled_text_embeds")
    zero_layers = ("controlnet_blocks", "pos_embed_input")
    compatibility_keys = ("in_channels", "patch_size", "joint_attention_dim", "caption_projection_dim",
                          "pooled_projection_dim", "num_attention_heads", "attention_head_dim")

    def encode_prompts(self, encoders: Encoders, prompts: list[str]) -> Embeds:
        clip, pooled = [], []
        length = encoders.tokenizer.model_max_length  # the pipeline pads both CLIPs to the first's length
        for tokenizer, encoder in ((encoders.tokenizer, encoders.text_encoder),
                                   (encoders.tokenizer_2, encoders.text_encoder_2)):
            out = encoder(token_ids(tokenizer, prompts, encoder.device, length), output_hidden_states=True)
            pooled.append(out[0])
            clip.append(out.hidden_states[-2])
        t5 = encoders.text_encoder_3(token_ids(encoders.tokenizer_3, prompts, encoders.text_encoder_3.device,
                                               T5_TOKENS))[0]
        per_token = F.pad(torch.cat(clip, dim=-1), (0, t5.shape[-1] - sum(c.shape[-1] for c in clip)))
        return {"text_embeds": torch.cat([per_token, t5], dim=-2), "pooled_text_embeds": torch.cat(pooled, dim=-1)}

    def new_controlnet(self, base: BaseModel) -> SD3ControlNetModel:
        # The transformer's last block is context-pre-only, a ControlNet's never: at most all the blocks before it.
        layers = min(CONTROLNET_LAYERS, base.denoiser.config.num_layers - 1)
        config = dict(base.denoiser.config)
        controlnet = SD3ControlNetModel.from_transformer(base.denoiser, num_layers=layers,
                                                         num_extra_conditioning_channels=0)
        base.denoiser.register_to_config(**config)  # from_transformer writes num_layers into the transformer's config
        return controlnet

    def control_shift(self, base: BaseModel, controlnet: Any) -> float:
        # InstantX-style ControlNets (force_zeros_for_pooled_projection) see unshifted latents in the pipeline
        return 0.0 if controlnet.config.force_zeros_for_pooled_projection else super().control_shift(base, controlnet)

    def predict(self, base: BaseModel, controlnet: Any, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Embeds, control: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
        text, pooled = embeds["text_embeds"], embeds["pooled_text_embeds"]
        config = controlnet.config
        blocks = controlnet(
            hidden_states=noisy, timestep=timesteps, controlnet_cond=control,
            encoder_hidden_states=text if config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            return_dict=False)[0]
        return base.denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text,
                             pooled_projections=pooled, block_controlnet_hidden_states=[b.to(weight_dtype) for b in blocks],
                             return_dict=False)[0]

    def pipeline_embeds(self, pipe: Any, prompts: list[str], guidance_scale: float) -> Embeds:
        return guided_pipeline_embeds(pipe.encode_prompt(prompts, None, None, device=pipe._execution_device,
                                                         do_classifier_free_guidance=guidance_scale > 1))

    def pipeline(self, base: BaseModel, scheduler: Any, controlnet: Any) -> StableDiffusion3Pipeline:
        parts = dict(transformer=base.denoiser, scheduler=scheduler, vae=base.vae, text_encoder=base.text_encoder,
                     tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                     text_encoder_3=base.text_encoder_3, tokenizer_3=base.tokenizer_3)
        if controlnet is None:
            return StableDiffusion3Pipeline(**parts)
        return StableDiffusion3ControlNetPipeline(**parts, controlnet=controlnet)
