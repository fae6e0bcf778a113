"""Creating, checking and saving ControlNets: plain diffusers ControlNet folders (``ControlNetModel``,
``SD3ControlNetModel``, ``FluxControlNetModel``, by the base's family) throughout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import torch

from metacontrol.atomic import atomic_files
from metacontrol.config_loader import ConfigError
from metacontrol.families import SD, ModelFamily
from metacontrol.models.base import load_failure, local_folder

if TYPE_CHECKING:
    from metacontrol.models.base import BaseModel

# Stable Diffusion's conditioning-embedding widths; it downsamples by 2 per entry after the first.
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of the condition embedding so it downsamples exactly like the base model's VAE."""
    blocks = vae_scale_factor.bit_length()  # x8 -> 4 entries, x4 -> 3
    if vae_scale_factor < 1 or vae_scale_factor & (vae_scale_factor - 1) or blocks > len(SD_CONDITIONING_CHANNELS):
        raise ConfigError(f"VAE scale factor {vae_scale_factor} is not supported; expected 1, 2, 4 or 8")
    return SD_CONDITIONING_CHANNELS[:blocks]


def create_controlnet(base: BaseModel, path: str | None = None) -> torch.nn.Module:
    """The standard initialisation of the base's family (``ControlNetModel.from_unet``,
    ``SD3ControlNetModel.from_transformer``...), or a saved ControlNet checked against the base."""
    family = base.family
    if path is None:
        return family.new_controlnet(base)
    folder = local_folder(path, "ControlNet folder")
    if folder is not None and not (folder / "config.json").is_file():
        raise ConfigError(f"ControlNet folder {path} has no config.json; expected a diffusers "
                          f"{family.controlnet_class} folder")
    try:
        controlnet = getattr(diffusers, family.controlnet_class).from_pretrained(str(folder) if folder is not None else path)
    except OSError as err:  # the Hub cannot be reached or has no such repository, or a file is unreadable
        raise ConfigError(f"cannot load the ControlNet {path}: {load_failure(err)}") from None
    family.check_compatible(controlnet, base, path)
    return controlnet


def model_card(title: str, fields: dict[str, object], body: str = "", family: ModelFamily = SD) -> str:
    """A short README.md for a saved ControlNet: what it is, how it was made, how to load it (in ``family``'s
    ControlNet pipeline)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in fields.items())
    pipeline = family.controlnet_pipeline_class
    extra = f",\n{' ' * (len(pipeline) + 24)}safety_checker=None" if family is SD else ""
    return (
        "---\nlibrary_name: diffusers\ntags: [controlnet, metacontrol]\n---\n\n"
        f"# {title}\n\n| | |\n|---|---|\n{rows}\n\n{body}\n"
        f"## Load\n\n```python\nfrom diffusers import {family.controlnet_class}, {pipeline}\n"
        f"controlnet = {family.controlnet_class}.from_pretrained(\"<this folder>\")\n"
        f"pipe = {pipeline}.from_pretrained(\"<base model>\", controlnet=controlnet{extra})\n```\n"
    )


def save_controlnet(controlnet: torch.nn.Module, output_dir: str | Path, card: str) -> Path:
    """Write ``config.json``, ``diffusion_pytorch_model.safetensors`` and ``README.md``, each atomically.

    Training keeps ControlNet weights in fp32 (mixed precision only casts activations), so this is fp32.
    """
    output_dir = Path(output_dir)
    with atomic_files(output_dir) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card)
    return output_dir
