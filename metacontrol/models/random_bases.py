"""Base models of the other families in their real diffusers / transformers classes, with random weights:
what tests (tiny) and benches (real shapes) train on where no checkpoint can be downloaded.

Tiny ones take the tiny architecture's VAE and word-level tokenizer (``models/tiny.py``) and the widths of
diffusers' own pipeline tests; real ones take the published configs' shapes (SDXL base 1.0).
"""

from __future__ import annotations

from typing import Literal

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from metacontrol.models.tiny import TinySDConfig, build_tokenizer, build_vae

Scale = Literal["tiny", "real"]
TIME_IDS = 6  # SDXL's added time conditioning: original size, crop corner, target size


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
        unet = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=0.13025)
    pooled = encoders[1].projection_dim
    unet_model = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=sum(c.hidden_size for c in encoders),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + TIME_IDS * time_dim, **unet)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(encoders[0]),
                                     text_encoder_2=CLIPTextModelWithProjection(encoders[1]), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet_model, scheduler=scheduler,
                                     add_watermarker=False)
