"""The tiny Stable-Diffusion-shaped architecture of the embedded default, built offline.

Same component classes and folder layout as SD 1.x (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel, a tokenizer, a DDPM schedule), only narrower, so every code path that serves SD 1.5
serves this model too. The tokenizer is a word-level vocabulary over the synthetic world's words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from metacontrol.config_loader import check

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"


@dataclass
class TinySDConfig:
    """Widths and depths of the tiny model. The defaults are what ships in checkpoints/tiny-sd."""

    resolution: int = 64
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # 3 blocks: x4 down
    latent_channels: int = 4
    vae_norm_groups: int = 8
    unet_channels: list[int] = field(default_factory=lambda: [64, 128])
    unet_norm_groups: int = 16
    unet_attention_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 32
    # Posterior log-variance at initialisation: starts the VAE with a narrow posterior, as SD's has,
    # so sampled latents stay close to the mean and a UNet trained on them needs no denoising of VAE noise.
    vae_initial_logvar: float = -6.0

    def __post_init__(self) -> None:
        check(len(self.vae_channels) >= 2, "vae_channels", self.vae_channels, "at least two blocks")
        factor = 2 ** (len(self.vae_channels) - 1)
        check(self.resolution % factor == 0, "resolution", self.resolution, f"a multiple of {factor}")
        check(self.text_hidden % self.text_heads == 0, "text_hidden", self.text_hidden,
              f"a multiple of text_heads ({self.text_heads})")


def build_tokenizer(words: list[str], max_tokens: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that behaves like CLIP's for pipelines: bos/eos added, padded to max."""
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_tokens,
    )  # fmt: skip


def build_text_encoder(cfg: TinySDConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(config)


def build_vae(cfg: TinySDConfig) -> AutoencoderKL:
    blocks = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.resolution,
    )
    conv_out = vae.encoder.conv_out  # 2 * latent_channels outputs: means, then log-variances
    with torch.no_grad():
        conv_out.bias[cfg.latent_channels :].fill_(cfg.vae_initial_logvar)
    return vae


def build_unet(cfg: TinySDConfig) -> UNet2DConditionModel:
    factor = 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=cfg.resolution // factor,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_attention_heads,
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training schedule: scaled-linear betas 0.00085..0.012, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )  # fmt: skip


def tiny_pipeline(cfg: TinySDConfig, words: list[str], vae: AutoencoderKL | None = None,
                  unet: UNet2DConditionModel | None = None, text_encoder: CLIPTextModel | None = None,
                  tokenizer: PreTrainedTokenizerFast | None = None) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of the tiny architecture; parts not given are randomly initialised.

    Inference uses DPM-Solver over the same SD-1.x betas the model is trained with.
    """
    tokenizer = tokenizer or build_tokenizer(words, cfg.max_tokens)
    return StableDiffusionPipeline(
        vae=vae or build_vae(cfg), text_encoder=text_encoder or build_text_encoder(cfg, tokenizer),
        tokenizer=tokenizer, unet=unet or build_unet(cfg),
        scheduler=DPMSolverMultistepScheduler.from_config(build_noise_scheduler().config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
