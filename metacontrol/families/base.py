"""What a base-model family decides, behind one interface: its text encoders and how prompts become the
denoiser's conditioning, what else the ControlNet and the denoiser read, and the diffusers pipelines that
generate with it. The training loop, freezing, LoRA, caches and checkpoints never ask which family it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from diffusers import ControlNetModel, DiffusionPipeline

    from metacontrol.models.base import BaseModel, Encoders

Embeds = dict[str, torch.Tensor]  # named prompt encodings, e.g. text_embeds (per token), pooled_text_embeds


class ModelFamily:
    """One diffusers pipeline family. Subclasses set the class names and override what differs."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # model_index.json's _class_name
    controlnet_pipeline_class: ClassVar[str]  # what a saved ControlNet loads into (its model card says so)
    # (text encoder subfolder, its transformers class, tokenizer subfolder), in the pipeline's order
    text_encoders: ClassVar[tuple[tuple[str, str, str], ...]]
    text_keys: ClassVar[tuple[str, ...]] = ("text_embeds",)  # what encode_prompts returns, cached per caption

    @property
    def components(self) -> tuple[str, ...]:
        """The subfolders a base model folder of this family needs."""
        texts = tuple(part for encoder, _, tokenizer in self.text_encoders for part in (encoder, tokenizer))
        return ("vae", "unet", *texts, "scheduler")

    def encode_prompts(self, encoders: Encoders, prompts: list[str]) -> Embeds:
        raise NotImplementedError

    def added_conditions(self, embeds: Embeds, size: tuple[int, int], dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments the ControlNet and the denoiser take beside the per-token embeddings, for images of
        ``size`` (height, width) in pixels; none for SD 1.x/2.x."""
        return {}

    def pipeline(self, base: BaseModel, scheduler: Any, controlnet: ControlNetModel | None) -> DiffusionPipeline:
        """The family's diffusers pipeline (with its ControlNet pipeline when ``controlnet`` is given) over the
        modules already in memory: never a second copy of the base."""
        raise NotImplementedError


def token_ids(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Prompts padded and truncated to the tokenizer's length, as diffusers' pipelines tokenize them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
