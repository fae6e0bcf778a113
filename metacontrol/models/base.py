"""Loading the frozen base model (VAE, UNet, text encoder, tokenizer, noise schedule) from one place.

A local diffusers folder (``checkpoints/tiny-sd``, a copy of SD 1.5) and a Hub id go through the same
``from_pretrained`` calls; only the location differs. Errors name the folder and the missing part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from metacontrol.configuration import ConfigError

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class BaseModel:
    """The Stable-Diffusion components a ControlNet is trained against."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    location: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def freeze(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> BaseModel:
        """Frozen, eval-mode, cast to the mixed-precision weight dtype: these never train here."""
        for module in (self.vae, self.unet, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Per-token text embeddings (the UNet's cross-attention input), as SD pipelines compute them."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # fmt: skip
        return self.text_encoder(ids)[0]


def _check_local_folder(path: Path) -> None:
    if not path.is_dir():
        raise ConfigError(f"base model folder {path} does not exist")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ConfigError(
            f"base model folder {path} lacks {', '.join(missing)}; expected a diffusers Stable Diffusion "
            f"folder with subfolders {', '.join(COMPONENTS)}"
        )


def load_base_model(location: str, revision: str | None = None) -> BaseModel:
    """Load the SD components from a local diffusers folder or a Hub id (``revision`` for the Hub)."""
    if location.startswith((".", "/", "~")) or Path(location).exists() or location.count("/") != 1:
        _check_local_folder(Path(location).expanduser())
    kwargs = {"revision": revision} if revision else {}
    return BaseModel(
        vae=AutoencoderKL.from_pretrained(location, subfolder="vae", **kwargs),
        unet=UNet2DConditionModel.from_pretrained(location, subfolder="unet", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **kwargs),
        tokenizer=AutoTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs),
        noise_scheduler=DDPMScheduler.from_pretrained(location, subfolder="scheduler", **kwargs),
        location=location,
    )
