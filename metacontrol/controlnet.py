"""Creating, checking and saving ControlNets: plain diffusers ``ControlNetModel`` folders throughout."""

from __future__ import annotations

from pathlib import Path

from diffusers import ControlNetModel, UNet2DConditionModel

from metacontrol.atomic import atomic_files
from metacontrol.config_loader import ConfigError
from metacontrol.families import SD, ModelFamily
from metacontrol.models.base import load_failure, local_folder

# Stable Diffusion's conditioning-embedding widths; it downsamples by 2 per entry after the first.
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of the condition embedding so it downsamples exactly like the base model's VAE."""
    blocks = vae_scale_factor.bit_length()  # x8 -> 4 entries, x4 -> 3
    if vae_scale_factor < 1 or vae_scale_factor & (vae_scale_factor - 1) or blocks > len(SD_CONDITIONING_CHANNELS):
        raise ConfigError(f"VAE scale factor {vae_scale_factor} is not supported; expected 1, 2, 4 or 8")
    return SD_CONDITIONING_CHANNELS[:blocks]


def check_compatible(controlnet: ControlNetModel, unet: UNet2DConditionModel, vae_scale_factor: int,
                     source: str) -> None:
    """Fail before training if a ControlNet was made for another base model."""
    problems = []
    for key in ("cross_attention_dim", "block_out_channels", "down_block_types", "layers_per_block", "in_channels",
                "addition_embed_type", "projection_class_embeddings_input_dim"):  # the last two: SDXL's
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if key == "down_block_types" and mine is not None:
            mine, theirs = [b.replace("Cross", "") for b in mine], [b.replace("Cross", "") for b in theirs]
        if list(mine) != list(theirs) if isinstance(mine, (list, tuple)) else mine != theirs:
            problems.append(f"{key}: ControlNet has {mine}, base UNet has {theirs}")
    embed = controlnet.config.get("conditioning_embedding_out_channels")
    if embed is not None and 2 ** (len(embed) - 1) != vae_scale_factor:
        problems.append(f"conditioning_embedding_out_channels {embed} downsample x{2 ** (len(embed) - 1)}, "
                        f"the base VAE x{vae_scale_factor}")
    if problems:
        raise ConfigError(f"ControlNet {source} does not fit the base model: " + "; ".join(problems))


def create_controlnet(unet: UNet2DConditionModel, vae_scale_factor: int, path: str | None = None) -> ControlNetModel:
    """The standard initialisation (``from_unet``: encoder copied, zero convolutions) or a saved ControlNet."""
    if path is None:
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(vae_scale_factor))
    folder = local_folder(path, "ControlNet folder")
    if folder is not None and not (folder / "config.json").is_file():
        raise ConfigError(f"ControlNet folder {path} has no config.json; expected a diffusers ControlNetModel folder")
    try:
        controlnet = ControlNetModel.from_pretrained(str(folder) if folder is not None else path)
    except OSError as err:  # the Hub cannot be reached or has no such repository, or a file is unreadable
        raise ConfigError(f"cannot load the ControlNet {path}: {load_failure(err)}") from None
    check_compatible(controlnet, unet, vae_scale_factor, path)
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
        f"## Load\n\n```python\nfrom diffusers import ControlNetModel, {pipeline}\n"
        "controlnet = ControlNetModel.from_pretrained(\"<this folder>\")\n"
        f"pipe = {pipeline}.from_pretrained(\"<base model>\", controlnet=controlnet{extra})\n```\n"
    )


def save_controlnet(controlnet: ControlNetModel, output_dir: str | Path, card: str) -> Path:
    """Write ``config.json``, ``diffusion_pytorch_model.safetensors`` and ``README.md``, each atomically.

    Training keeps ControlNet weights in fp32 (mixed precision only casts activations), so this is fp32.
    """
    output_dir = Path(output_dir)
    with atomic_files(output_dir) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card)
    return output_dir
