"""What a base-model family decides, behind one interface: its denoiser and text encoders, how prompts become
the denoiser's conditioning, its ControlNet (create, load, check), its training loss, and the diffusers
pipelines that generate with it. The training loop, LoRA, caches and checkpoints never ask which family it is.

Two halves share the rest: ``UNetFamily`` (SD 1.x/2.x, SDXL: ``ControlNetModel.from_unet``, epsilon or v
prediction on DDPM noise, the condition map in pixels) and ``FlowFamily`` (SD3, Flux: a transformer ControlNet,
rectified-flow loss with logit-normal timesteps, the condition map through the VAE).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import diffusers
import torch
import torch.nn.functional as F

from metacontrol.config_loader import ConfigError
from metacontrol.layer_sets import LORA_FULLY_TRAINED, LORA_TARGET_MODULES

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from metacontrol.models.base import BaseModel, Encoders

Embeds = dict[str, torch.Tensor]  # named prompt encodings, e.g. text_embeds (per token), pooled_text_embeds


class ModelFamily:
    """One diffusers pipeline family. Subclasses set the class names and override what differs."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # model_index.json's _class_name
    controlnet_pipeline_class: ClassVar[str]  # what a saved ControlNet loads into (its model card says so)
    controlnet_class: ClassVar[str]  # the diffusers ControlNet class
    denoiser_folder: ClassVar[str]
    denoiser_class: ClassVar[str]
    denoiser_label: ClassVar[str]  # how errors name it
    scheduler_class: ClassVar[str]  # the training noise schedule, read from the base's scheduler/ folder
    # (text encoder subfolder, its transformers class, tokenizer subfolder), in the pipeline's order
    text_encoders: ClassVar[tuple[tuple[str, str, str], ...]]
    text_keys: ClassVar[tuple[str, ...]] = ("text_embeds",)  # what encode_prompts returns, cached per caption
    control_image_argument: ClassVar[str] = "image"  # the ControlNet pipeline's keyword for the condition map
    lora_target_modules: ClassVar[list[str]]  # defaults of fine-tuning's lora_target_modules / lora_modules_to_save
    lora_fully_trained: ClassVar[list[str]]
    compatibility_keys: ClassVar[tuple[str, ...]]  # config entries a ControlNet must share with the denoiser

    @property
    def components(self) -> tuple[str, ...]:
        """The subfolders a base model folder of this family needs."""
        texts = tuple(part for encoder, _, tokenizer in self.text_encoders for part in (encoder, tokenizer))
        return ("vae", self.denoiser_folder, *texts, "scheduler")

    def encode_prompts(self, encoders: Encoders, prompts: list[str]) -> Embeds:
        raise NotImplementedError

    def new_controlnet(self, base: BaseModel) -> torch.nn.Module:
        """The standard initialisation: the ControlNet copied from the denoiser, its output layers zero."""
        raise NotImplementedError

    def loss(self, base: BaseModel, controlnet: torch.nn.Module, latents: torch.Tensor, embeds: Embeds,
             cond: torch.Tensor, generator: torch.Generator, weight_dtype: torch.dtype,
             context: AbstractContextManager) -> torch.Tensor:
        """The training loss of one batch: ``latents`` scaled VAE samples, ``cond`` the condition maps in [0, 1]
        (both in the weight dtype); every random draw from ``generator``; forward passes inside ``context``."""
        raise NotImplementedError

    def pipeline(self, base: BaseModel, scheduler: Any, controlnet: torch.nn.Module | None) -> DiffusionPipeline:
        """The family's diffusers pipeline (its ControlNet pipeline when ``controlnet`` is given) over the
        modules already in memory: never a second copy of the base."""
        raise NotImplementedError

    def pipeline_embeds(self, pipe: DiffusionPipeline, prompts: list[str], guidance_scale: float) -> Embeds:
        """What ``pipe.encode_prompt`` makes of ``prompts`` (with the negative ones where it guides), named as the
        pipeline's ``__call__`` takes them instead of prompts: it then generates without its text encoders."""
        raise NotImplementedError

    def sampler(self, base: BaseModel, name: str) -> Any:
        """The inference scheduler ``name`` (a diffusers class), built from the base's training schedule."""
        return getattr(diffusers, name).from_config(base.noise_scheduler.config)

    def freeze_patterns(self, preset: str, controlnet: torch.nn.Module) -> list[str]:
        """Frozen-name patterns of a freezing preset (``freezing.preset_patterns``) for this family's ControlNet."""
        raise NotImplementedError

    def check_compatible(self, controlnet: torch.nn.Module, base: BaseModel, source: str) -> None:
        """Fail before training if a ControlNet was made for another base model."""
        problems = []
        for key in self.compatibility_keys:
            mine, theirs = controlnet.config.get(key), base.denoiser.config.get(key)
            if key == "down_block_types" and mine is not None:
                mine, theirs = [b.replace("Cross", "") for b in mine], [b.replace("Cross", "") for b in theirs]
            if list(mine) != list(theirs) if isinstance(mine, (list, tuple)) else mine != theirs:
                problems.append(f"{key}: ControlNet has {mine}, base {self.denoiser_label} has {theirs}")
        problems += self._more_problems(controlnet, base)
        if problems:
            raise ConfigError(f"ControlNet {source} does not fit the base model: " + "; ".join(problems))

    def _more_problems(self, controlnet: torch.nn.Module, base: BaseModel) -> list[str]:
        return []


class UNetFamily(ModelFamily):
    """SD-style: ``ControlNetModel.from_unet``, the diffusers ``train_controlnet.py`` loss."""

    controlnet_class = "ControlNetModel"
    denoiser_folder = "unet"
    denoiser_class = "UNet2DConditionModel"
    denoiser_label = "UNet"
    scheduler_class = "DDPMScheduler"
    lora_target_modules = LORA_TARGET_MODULES
    lora_fully_trained = LORA_FULLY_TRAINED
    compatibility_keys = ("cross_attention_dim", "block_out_channels", "down_block_types", "layers_per_block",
                          "in_channels", "addition_embed_type", "projection_class_embeddings_input_dim")

    def added_conditions(self, embeds: Embeds, size: tuple[int, int], dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments the ControlNet and the UNet take beside the per-token embeddings, for images of
        ``size`` (height, width) in pixels; none for SD 1.x/2.x."""
        return {}

    def new_controlnet(self, base: BaseModel) -> torch.nn.Module:
        from metacontrol.controlnet import conditioning_channels

        return diffusers.ControlNetModel.from_unet(
            base.denoiser, conditioning_embedding_out_channels=conditioning_channels(base.vae_scale_factor))

    def _more_problems(self, controlnet: torch.nn.Module, base: BaseModel) -> list[str]:
        embed = controlnet.config.get("conditioning_embedding_out_channels")
        if embed is not None and 2 ** (len(embed) - 1) != base.vae_scale_factor:
            return [f"conditioning_embedding_out_channels {embed} downsample x{2 ** (len(embed) - 1)}, "
                    f"the base VAE x{base.vae_scale_factor}"]
        return []

    def freeze_patterns(self, preset: str, controlnet: torch.nn.Module) -> list[str]:
        # Meta ControlNet freezes encoder block 4 and the middle block of SD 1.x: the last down block here.
        if preset == "paper":
            return [f"down_blocks.{len(controlnet.down_blocks) - 1}.*", "mid_block.*"]
        if preset == "zero_convs_only":
            return _all_but(controlnet, ("controlnet_down_blocks.*", "controlnet_mid_block.*"))
        if preset == "embedding_and_zero_convs":  # the condition encoder trains too
            return _all_but(controlnet, ("controlnet_cond_embedding.*", "controlnet_down_blocks.*",
                                         "controlnet_mid_block.*"))
        raise ConfigError(f"freeze preset {preset!r} is for transformer ControlNets (SD3, Flux); "
                          f"{self.name} has paper, zero_convs_only, none")

    def loss(self, base: BaseModel, controlnet: torch.nn.Module, latents: torch.Tensor, embeds: Embeds,
             cond: torch.Tensor, generator: torch.Generator, weight_dtype: torch.dtype,
             context: AbstractContextManager) -> torch.Tensor:
        device, scheduler = latents.device, base.noise_scheduler
        text = embeds["text_embeds"]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        noisy = scheduler.add_noise(latents.float(), noise, timesteps).to(weight_dtype)
        added = self.added_conditions(embeds, tuple(cond.shape[-2:]), weight_dtype)
        with context:
            down, mid = controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=cond,
                                   return_dict=False, **added)
            pred = base.denoiser(
                noisy, timesteps, encoder_hidden_states=text, **added,
                down_block_additional_residuals=[r.to(weight_dtype) for r in down],
                mid_block_additional_residual=mid.to(weight_dtype),
            ).sample  # fmt: skip
        prediction = scheduler.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = scheduler.get_velocity(latents.float(), noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {prediction!r}")
        return F.mse_loss(pred.float(), target.float())


class FlowFamily(ModelFamily):
    """Transformer families trained by flow matching (SD3, Flux), as diffusers' ``train_controlnet_sd3.py`` /
    ``train_controlnet_flux.py`` do: timesteps drawn logit-normal (mean 0, std 1) from the base's
    ``FlowMatchEulerDiscreteScheduler``, ``x_t = (1 - sigma) x_0 + sigma noise``, target ``noise - x_0``; the
    condition map enters as VAE latents (posterior mean, shifted and scaled as the image's)."""

    denoiser_folder = "transformer"
    denoiser_label = "transformer"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    control_image_argument = "control_image"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out"]
    zero_layers: ClassVar[tuple[str, ...]]  # the ControlNet's zero-initialised layers

    @property
    def lora_fully_trained(self) -> list[str]:  # type: ignore[override]
        return list(self.zero_layers)

    def sampler(self, base: BaseModel, name: str) -> Any:
        """Flow-matching models sample with their own flow-matching Euler scheduler (the SD samplers of
        ``settings.scheduler`` do not apply)."""
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config)

    def freeze_patterns(self, preset: str, controlnet: torch.nn.Module) -> list[str]:
        # later_blocks: the second half of the ControlNet's transformer blocks (of each kind), for adapting only
        # the early, condition-facing ones and the zero layers.
        if preset == "later_blocks":
            patterns = []
            for blocks in ("transformer_blocks", "single_transformer_blocks"):
                count = len(getattr(controlnet, blocks, []))
                patterns += [f"{blocks}.{i}.*" for i in range(count // 2, count)]
            return patterns
        if preset in ("zero_convs_only", "embedding_and_zero_convs"):  # the condition's embedding is a zero layer here
            return _all_but(controlnet, tuple(f"{layer}.*" for layer in self.zero_layers))
        raise ConfigError(f"freeze preset {preset!r} is SD's encoder-block preset; {self.name}'s transformer "
                          "ControlNet has later_blocks, zero_convs_only, none")

    def control_shift(self, base: BaseModel, controlnet: torch.nn.Module) -> float:
        """What the ControlNet pipeline subtracts from the condition's latents before scaling: the VAE's shift."""
        return base.vae.config.shift_factor or 0.0

    def encode_control(self, base: BaseModel, cond: torch.Tensor, controlnet: torch.nn.Module) -> torch.Tensor:
        """Condition maps in [0, 1] -> shifted, scaled VAE latents (posterior mean), in ``cond``'s dtype, as the
        family's ControlNet pipeline encodes them for ``controlnet``."""
        vae = base.vae
        dist = vae.encode((cond * 2 - 1).to(vae.dtype)).latent_dist
        return ((dist.mean - self.control_shift(base, controlnet)) * vae.config.scaling_factor).to(cond.dtype)

    def predict(self, base: BaseModel, controlnet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Embeds, control: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's velocity for ``noisy`` latents under the ControlNet's residuals."""
        raise NotImplementedError

    def loss(self, base: BaseModel, controlnet: torch.nn.Module, latents: torch.Tensor, embeds: Embeds,
             cond: torch.Tensor, generator: torch.Generator, weight_dtype: torch.dtype,
             context: AbstractContextManager) -> torch.Tensor:
        device, scheduler = latents.device, base.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
        u = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))  # logit-normal(0, 1)
        index = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[index].to(device)
        sigmas = scheduler.sigmas[index].to(device, torch.float32).view(-1, 1, 1, 1)
        noisy = ((1 - sigmas) * latents.float() + sigmas * noise).to(weight_dtype)
        with torch.no_grad():
            control = self.encode_control(base, cond, controlnet)
        with context:
            pred = self.predict(base, controlnet, noisy, timesteps, embeds, control, weight_dtype)
        return F.mse_loss(pred.float(), noise - latents.float())


def _all_but(controlnet: torch.nn.Module, kept: tuple[str, ...]) -> list[str]:
    """Every parameter name outside the ``kept`` patterns (``zero_convs_only``: all but the zero layers)."""
    from metacontrol.freezing import matches

    names = [n for n, _ in controlnet.named_parameters()]
    return sorted({n for n in names if not any(matches(n, p) for p in kept)})


def guided_pipeline_embeds(outputs: tuple) -> Embeds:
    """``encode_prompt``'s four outputs in SDXL's and SD3's pipelines, by the names their ``__call__`` takes."""
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, outputs))


def token_ids(tokenizer: Any, prompts: list[str], device: torch.device, length: int | None = None) -> torch.Tensor:
    """Prompts padded and truncated to ``length`` (default: the tokenizer's), as diffusers' pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
