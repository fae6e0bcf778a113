"""Base models of the other families in their real diffusers / transformers classes, with random weights:
what tests (tiny) and benches (real shapes) train on where no checkpoint can be downloaded.

Tiny ones take the tiny architecture's VAE and word-level tokenizer (``models/tiny.py``) and about the widths
of diffusers' own pipeline tests; real ones take the published configs' shapes (SDXL base 1.0).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from metacontrol.models.tiny import TinySDConfig, build_tokenizer, build_vae

Scale = Literal["tiny", "real"]
TIME_IDS = 6  # SDXL's added time conditioning: original size, crop corner, target size


SDXL_UNET_BLOCKS = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20))  # SDXL base 1.0


def sdxl_unet(blocks: dict, text_width: int, pooled_width: int, time_dim: int) -> UNet2DConditionModel:
    """An SDXL UNet of ``blocks`` (e.g. ``SDXL_UNET_BLOCKS``): per-token text of ``text_width``, and the pooled
    embedding plus six time ids as its added ``text_time`` conditioning."""
    return UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=text_width, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=pooled_width + TIME_IDS * time_dim, **blocks)


def _clip_config(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int,
                 projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=tokenizer.model_max_length, projection_dim=projection or hidden,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, hidden_act="gelu")


def sdxl_pipeline(scale: Scale, words: list[str], tiny: TinySDConfig | None = None) -> StableDiffusionXLPipeline:
    """An SDXL pipeline: a ``text_time`` UNet, CLIP-L-like and bigG-like text encoders (the second with a
    projection: the pooled embedding), an SD VAE and SDXL's Euler schedule. ``tiny`` sets the VAE, the tokenizer
    length and the width of each text encoder; real: SDXL base 1.0's UNet (2.6 B parameters) and encoders."""
    tiny = tiny or TinySDConfig()
    if scale == "tiny":
        tokenizer = build_tokenizer(words, tiny.max_tokens)
        time_dim = 8
        encoders = [_clip_config(tokenizer, tiny.text_hidden, tiny.text_layers, tiny.text_heads),
                    _clip_config(tokenizer, tiny.text_hidden, tiny.text_layers, tiny.text_heads)]
        factor = 2 ** (len(tiny.vae_channels) - 1)
        unet = dict(sample_size=tiny.resolution // factor, block_out_channels=tuple(tiny.unet_channels),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
                        "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, transformer_layers_per_block=(1, 2),
                    attention_head_dim=(2, 4), norm_num_groups=tiny.unet_norm_groups)
        vae = build_vae(tiny)
    else:
        tokenizer = build_tokenizer(words, 77)
        time_dim = 256
        encoders = [_clip_config(tokenizer, 768, 12, 12), _clip_config(tokenizer, 1280, 32, 20, projection=1280)]
        unet = SDXL_UNET_BLOCKS
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=0.13025)
    unet_model = sdxl_unet(unet, sum(c.hidden_size for c in encoders), encoders[1].projection_dim, time_dim)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(encoders[0]),
                                     text_encoder_2=CLIPTextModelWithProjection(encoders[1]), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet_model, scheduler=scheduler,
                                     add_watermarker=False)


def _t5(tokenizer: PreTrainedTokenizerFast, width: int, layers: int, heads: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=width * 2, d_kv=width // heads,
                                   num_layers=layers, num_heads=heads, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def _flow_vae(tiny: TinySDConfig, latent_channels: int, shift: float, scale: float) -> AutoencoderKL:
    vae = build_vae(replace(tiny, latent_channels=latent_channels))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def sd3_pipeline(words: list[str], tiny: TinySDConfig | None = None) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline: an MMDiT (patch 2, 16 latent channels), two projected CLIPs whose widths sum to T5's
    (as SD3's 768 + 1280 <= 4096), a T5 encoder, a shifted VAE and SD3's flow-matching schedule (shift 3)."""
    tiny = tiny or TinySDConfig()
    tokenizer = build_tokenizer(words, tiny.max_tokens)
    clip = _clip_config(tokenizer, tiny.text_hidden, tiny.text_layers, tiny.text_heads)
    width = 2 * tiny.text_hidden
    factor = 2 ** (len(tiny.vae_channels) - 1)
    transformer = SD3Transformer2DModel(sample_size=tiny.resolution // factor, patch_size=2, in_channels=16,
                                        out_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=width, caption_projection_dim=16,
                                        pooled_projection_dim=2 * clip.projection_dim, pos_embed_max_size=32)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(tiny, 16, 0.0609, 1.5305), text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tokenizer,
        text_encoder_3=_t5(tokenizer, width, 2, 2), tokenizer_3=tokenizer)


def flux_pipeline(words: list[str], tiny: TinySDConfig | None = None) -> FluxPipeline:
    """A tiny Flux.1-dev-like pipeline: double and single blocks over packed latents (16 channels packed 2x2),
    guidance embedding, CLIP (pooled) and T5 (per token), a shifted VAE and Flux's dynamically shifted schedule."""
    tiny = tiny or TinySDConfig()
    tokenizer = build_tokenizer(words, tiny.max_tokens)
    clip = _clip_config(tokenizer, tiny.text_hidden, tiny.text_layers, tiny.text_heads)
    width = 2 * tiny.text_hidden
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * 4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=width,
                                         pooled_projection_dim=tiny.text_hidden, guidance_embeds=True,
                                         axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=_flow_vae(tiny, 4, 0.1159, 0.3611), text_encoder=CLIPTextModel(clip),
                        tokenizer=tokenizer, text_encoder_2=_t5(tokenizer, width, 2, 2), tokenizer_2=tokenizer,
                        transformer=transformer)
