"""Base-model families, chosen from a base folder's ``model_index.json`` (its ``_class_name``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from metacontrol.config_loader import ConfigError
from metacontrol.families.base import Embeds, FlowFamily, ModelFamily, UNetFamily
from metacontrol.families.flux import Flux
from metacontrol.families.sd import StableDiffusion
from metacontrol.families.sd3 import StableDiffusion3
from metacontrol.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, ModelFamily] = {family.pipeline_class: family for family in (
    StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
SD = FAMILIES["StableDiffusionPipeline"]

__all__ = ["FAMILIES", "SD", "Embeds", "FlowFamily", "ModelFamily", "UNetFamily", "family_named", "family_of",
           "family_of_controlnet"]


def family_named(pipeline_class: str, where: str) -> ModelFamily:
    """The family of a pipeline class name, or one line naming what was found and what is known."""
    family = FAMILIES.get(pipeline_class)
    if family is None:
        known = ", ".join(f"{name} ({f.name})" for name, f in FAMILIES.items())
        raise ConfigError(f"{where} is a {pipeline_class}; metacontrol trains ControlNets for {known}")
    return family


def family_of(folder: Path | None, location: str, revision: str | None = None) -> ModelFamily:
    """The family of a base model: a local ``folder`` (one without ``model_index.json`` is read as SD 1.x/2.x,
    as older copies are), or the Hub's ``location``."""
    if folder is not None:
        index = folder / "model_index.json"
        if not index.is_file():
            return SD
        try:
            name = json.loads(index.read_text())["_class_name"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{index}: unreadable or without _class_name ({err})") from None
        return family_named(name, f"base model folder {location}")
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(location, revision=revision)
    return family_named(config["_class_name"], f"base model {location}")


def family_of_controlnet(controlnet: torch.nn.Module) -> ModelFamily:
    """The first family whose ControlNet class ``controlnet`` is (SD and SDXL share ``ControlNetModel``, and all
    that depends on the class alone, such as freezing presets, is the same for both)."""
    name = type(controlnet).__name__
    for family in FAMILIES.values():
        if family.controlnet_class == name:
            return family
    raise ConfigError(f"a {name} is not a ControlNet of any family metacontrol knows")
