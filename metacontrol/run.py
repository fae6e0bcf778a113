"""What every training run does around its loop: set-up, resume-or-start, the cross-process failure check,
and saving the result with its model card. The loops themselves stay in ``metacontrol/scripts/``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import ControlNetModel

from metacontrol.atomic import remove_stale_writes
from metacontrol.checkpointing import TrainingState, resolve_resume_path
from metacontrol.config import RunConfig
from metacontrol.config_loader import ConfigError, save_config, to_dict
from metacontrol.controlnet import create_controlnet, model_card
from metacontrol.families import SD, ModelFamily
from metacontrol.lora import save_adapted
from metacontrol.models.base import BaseModel, load_base_model
from metacontrol.processes import agreed

logger = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """What a training script starts from: the Accelerator, the frozen base model in the weight dtype and
    the ControlNet to train, in fp32 (mixed precision casts activations, never the master weights)."""

    accelerator: Accelerator
    weight_dtype: torch.dtype
    base: BaseModel
    controlnet: ControlNetModel


def set_up_run(cfg: RunConfig) -> RunSetup:
    """Accelerator, logging, threads and seed; the base (validated against the config) and the ControlNet.

    Leftovers of an interrupted checkpoint write in ``output_dir`` are removed before any process writes
    there. The ControlNet comes from ``controlnet_model_name_or_path`` (checked against the base) or
    ``ControlNetModel.from_unet``.
    """
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown ours
    if accelerator.is_main_process:
        remove_stale_writes(output_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        raise ConfigError(f"mixed_precision: 'fp16' needs a GPU (accelerate runs fp16 autocast and loss scaling "
                          f"only there, not on {accelerator.device.type!r}); use bf16 or no here")
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # what `accelerate launch` reported, maybe 'no'
    overridden = cfg.mixed_precision is not None and launched not in (None, cfg.mixed_precision)
    logger.info("mixed precision: %s%s", accelerator.mixed_precision,
                f" (the config's mixed_precision; accelerate launch's {launched!r} does not apply)" if overridden else "")

    base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision)
    if cfg.resolution % base.vae_scale_factor:
        raise ConfigError(f"resolution: {cfg.resolution} is not divisible by the VAE's downsampling factor "
                          f"{base.vae_scale_factor} of {cfg.pretrained_model_name_or_path}")
    # From the fp32 UNet, before the base is cast: a bf16/fp16 copy would start the ControlNet rounded.
    controlnet = create_controlnet(base, cfg.controlnet_model_name_or_path)
    base.freeze(weight_dtype, accelerator.device)
    configure_attention(cfg, controlnet, base)
    controlnet.to(accelerator.device, dtype=torch.float32).train()
    return RunSetup(accelerator, weight_dtype, base, controlnet)


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def configure_attention(cfg: RunConfig, controlnet: torch.nn.Module, base: BaseModel) -> None:
    """SDPA is the default; xformers only when asked for, and then it must be there."""
    if cfg.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError("enable_xformers_memory_efficient_attention: xformers is not installed; "
                              "`pip install metacontrol[xformers]` on a CUDA machine, or set it to false") from None
        base.denoiser.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()


def resume_or_start(cfg: RunConfig, accelerator: Accelerator, state: TrainingState, *, config_name: str,
                    project: str, unit: str) -> None:
    """Load ``resume_from_checkpoint`` into ``state`` if one is given, then write the run's config into
    ``output_dir`` and start the trackers. ``unit``: what a step is called."""
    output_dir = Path(cfg.output_dir)
    resume = resolve_resume_path(cfg.resume_from_checkpoint, output_dir)
    if resume is not None:
        state.read(resume, accelerator.process_index)
        logger.info("resumed from %s at %s %d", resume, unit, state.progress.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / config_name)
    accelerator.init_trackers(project, config=flat_config(cfg))


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Scalars only, dotted keys: what trackers (tensorboard hparams) accept."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(to_dict(cfg), "")
    return flat


def save_result(accelerator: Accelerator, model: torch.nn.Module, folder: Path, cfg: RunConfig, title: str,
                rows: dict[str, object], note: str = "", family: ModelFamily = SD) -> Path:
    """The main process saves ``model`` as a diffusers ControlNet (LoRA: merged, adapter in ``lora/``) with
    a model card: the rows every run states (base, start, precision, seed), then ``rows``. The others wait,
    and stop too if the write fails (``agreed``)."""
    with agreed(accelerator, f"saving {folder}"):
        if accelerator.is_main_process:
            card = model_card(title, {
                "base model": cfg.pretrained_model_name_or_path,
                "initialisation": cfg.controlnet_model_name_or_path or "from_unet (standard ControlNet initialisation)",
                **rows,
                "resolution": cfg.resolution,
                "mixed precision": accelerator.mixed_precision,
                "seed": cfg.seed,
            }, note, family)  # fmt: skip
            save_adapted(model, folder, card)
    return folder
