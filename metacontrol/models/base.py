"""Loading the frozen base model (VAE, UNet, text encoders, tokenizers, noise schedule) from one place.

A local diffusers folder (``checkpoints/tiny-sd``, a copy of SD 1.5) and a Hub id go through the same
``from_pretrained`` calls; only the location differs. Its family (``metacontrol/families``, from
``model_index.json``) says which text encoders it has and how prompts are encoded. Errors name the folder
and the missing part. ``local_folder`` decides which of the two a location is, for base models and
ControlNets alike.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL
from huggingface_hub import constants
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from metacontrol.config_loader import ConfigError
from metacontrol.families import SD, Embeds, ModelFamily, family_of


class _NothingToKeepInFp32(logging.Filter):
    """Drops diffusers' warning on every ``.to(dtype)`` of a model with no module to keep in fp32 ("should be
    kept in float32: []"): three lines per run that name nothing. The warning for a real list still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NothingToKeepInFp32())
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name: the only shape looked up on the Hub


@dataclass
class Encoders:
    """The frozen encoders whose outputs are cached (VAE, text encoders, tokenizers): all ``prepare`` loads.
    ``text_encoder_2`` / ``_3`` and their tokenizers: the further ones of the families that have them (SDXL,
    SD3, Flux), named as in the family's diffusers pipeline."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    location: str
    family: ModelFamily = SD
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    @property
    def text_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Embeds:
        """The family's prompt encodings (per-token ``text_embeds``, and pooled ones where it has them), as its
        diffusers pipeline computes them."""
        return self.family.encode_prompts(self, prompts)


@dataclass(kw_only=True)
class BaseModel(Encoders):
    """The components a ControlNet is trained against: the encoders, the frozen denoiser and its noise schedule."""

    denoiser: torch.nn.Module  # UNet2DConditionModel (SD, SDXL), SD3Transformer2DModel, FluxTransformer2DModel
    noise_scheduler: Any  # the training schedule: DDPMScheduler (UNet families) or FlowMatchEulerDiscreteScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def freeze(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> BaseModel:
        """Frozen and in eval mode: these never train here. Only the denoiser, which runs every step, is cast to
        the mixed-precision weight dtype. The encoders stay fp32: their outputs are cached once per dataset,
        so the cache does not depend on the run's precision, and SD VAEs are ``force_upcast`` (they overflow
        in fp16)."""
        for module in (self.vae, self.denoiser, *self.text_modules):
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype if module is self.denoiser else torch.float32)
        return self


def local_folder(location: str, what: str) -> Path | None:
    """The local folder ``location`` names, or None for a Hub id; a local path that does not exist is an error.

    Local, so never looked up on the Hub (where a typo costs retries and a page of tracebacks): a path
    that exists here; one that starts with ``.``, ``/`` or ``~`` or has a backslash; anything not of
    the Hub's ``org/name`` shape; and ``org/name`` whose ``org`` is a folder here
    (``checkpoints/tiny-sdd`` next to ``checkpoints/tiny-sd``). ``what`` names it in the error.
    ``checkpoints/...`` not in the working directory is the package's copy (``metacontrol/shipped.py``),
    so the defaults load outside a checkout.
    """
    from metacontrol.shipped import shipped_path

    path = shipped_path(Path(location).expanduser())
    if path.exists():
        return path
    parent = shipped_path(path.parent)  # the package's checkpoints/ when the working directory has none
    looks_local = (location.startswith((".", "/", "~")) or "\\" in location or not HUB_ID.fullmatch(location)
                   or parent.is_dir())
    if not looks_local:
        return None
    siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, siblings, n=1)
    hint = f"; did you mean {path.parent / close[0]}?" if close else ""
    raise ConfigError(f"{what} {location} does not exist{hint}")


def load_failure(err: OSError) -> str:
    """The first line of a loader's error (the rest is advice about network settings), and offline mode."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    offline = " (HF_HUB_OFFLINE is set: only the local Hub cache was searched)" if constants.HF_HUB_OFFLINE else ""
    return line + offline


def _cannot_load(location: str, err: OSError) -> ConfigError:
    """The Hub cannot be reached or has no such repository, or a file is unreadable: one line."""
    return ConfigError(f"pretrained_model_name_or_path: cannot load {location}: {load_failure(err)}")


def _loader(location: str, revision: str | None, skip: tuple[str, ...] = ()) -> tuple[str, dict, ModelFamily]:
    """The folder (or Hub id) to load from and its family, after checking a local folder has the family's
    subfolders (less those in ``skip``)."""
    folder = local_folder(location, "pretrained_model_name_or_path: base model folder")
    try:
        family = family_of(folder, location, revision)
    except OSError as err:
        raise _cannot_load(location, err) from None
    needed = [c for c in family.components if c not in skip]
    if folder is not None and (missing := [c for c in needed if not (folder / c).is_dir()]):
        raise ConfigError(
            f"base model folder {location} lacks {', '.join(missing)}; expected a diffusers "
            f"{family.pipeline_class} folder with subfolders {', '.join(family.components)}"
        )
    return (str(folder) if folder is not None else location), ({"revision": revision} if revision else {}), family


def _encoder_parts(source: str, kwargs: dict, family: ModelFamily) -> dict[str, Any]:
    """The VAE and the family's text encoders and tokenizers, by their pipeline names."""
    parts: dict[str, Any] = {"vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)}
    for encoder, cls, tokenizer in family.text_encoders:
        parts[encoder] = getattr(transformers, cls).from_pretrained(source, subfolder=encoder, **kwargs)
        parts[tokenizer] = AutoTokenizer.from_pretrained(source, subfolder=tokenizer, **kwargs)
    return parts


def load_encoders(location: str, revision: str | None = None) -> Encoders:
    """The VAE, text encoders and tokenizers of a base model (no denoiser: a third of SD 1.5's bytes saved)."""
    source, kwargs, family = _loader(location, revision, skip=("unet", "transformer", "scheduler"))
    try:
        return Encoders(location=location, family=family, **_encoder_parts(source, kwargs, family))
    except OSError as err:
        raise _cannot_load(location, err) from None


def load_base_model(location: str, revision: str | None = None) -> BaseModel:
    """Load a base model's components from a local diffusers folder or a Hub id (``revision`` for the Hub); its
    family is read once."""
    source, kwargs, family = _loader(location, revision)
    try:
        return BaseModel(
            location=location, family=family, **_encoder_parts(source, kwargs, family),
            denoiser=getattr(diffusers, family.denoiser_class).from_pretrained(
                source, subfolder=family.denoiser_folder, **kwargs),
            noise_scheduler=getattr(diffusers, family.scheduler_class).from_pretrained(
                source, subfolder="scheduler", **kwargs),
        )
    except OSError as err:
        raise _cannot_load(location, err) from None
