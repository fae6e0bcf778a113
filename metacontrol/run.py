"""What every training run does around its loop: set-up, resume-or-start, the cross-process failure check,
and saving the result with its model card. The loops themselves stay in ``metacontrol/scripts/``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import ControlNetModel

from metacontrol.atomic import remove_stale_writes
from metacontrol.checkpointing import TrainingProgress, resolve_resume_path
from metacontrol.config import RunConfig
from metacontrol.config_loader import ConfigError, save_config, to_dict
from metacontrol.controlnet import create_controlnet, model_card
from metacontrol.lora import save_adapted
from metacontrol.models.base import BaseModel, load_base_model
from metacontrol.objective import NonFiniteLossError

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
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)

    base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision)
    if cfg.resolution % base.vae_scale_factor:
        raise ConfigError(f"resolution: {cfg.resolution} is not divisible by the VAE's downsampling factor "
                          f"{base.vae_scale_factor} of {cfg.pretrained_model_name_or_path}")
    base.freeze(weight_dtype, accelerator.device)
    controlnet = create_controlnet(base.unet, base.vae_scale_factor, cfg.controlnet_model_name_or_path)
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
        base.unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()


def resume_or_start(cfg: RunConfig, accelerator: Accelerator, progress: TrainingProgress,
                    checkpointed: Iterable[Any], *, config_name: str, project: str, unit: str) -> None:
    """Register what checkpoints hold besides ``prepare``d objects, load ``resume_from_checkpoint`` if any,
    then write the run's config into ``output_dir`` and start the trackers. ``unit``: what a step is called."""
    for obj in (*checkpointed, progress):
        accelerator.register_for_checkpointing(obj)
    output_dir = Path(cfg.output_dir)
    resume = resolve_resume_path(cfg.resume_from_checkpoint, output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at %s %d", resume, unit, progress.step)
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


def stop_if_failed_anywhere(accelerator: Accelerator, failure: FloatingPointError | None) -> None:
    """Raise this process's failure, or one naming another process's, once any process has failed.

    Every process calls it at the same point of a step, so all learn of a NaN anywhere before the next
    collective: none is left waiting in it forever.
    """
    failed = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item() > 0:
        raise failure or NonFiniteLossError("a non-finite loss on another process stopped the run")


def save_result(accelerator: Accelerator, model: torch.nn.Module, folder: Path, cfg: RunConfig, title: str,
                rows: dict[str, object], note: str = "") -> Path:
    """The main process saves ``model`` as a diffusers ControlNet (LoRA: merged, adapter in ``lora/``) with
    a model card: the rows every run states (base, start, precision, seed), then ``rows``; all wait."""
    if accelerator.is_main_process:
        card = model_card(title, {
            "base model": cfg.pretrained_model_name_or_path,
            "initialisation": cfg.controlnet_model_name_or_path or "from_unet (standard ControlNet initialisation)",
            **rows,
            "resolution": cfg.resolution,
            "mixed precision": accelerator.mixed_precision,
            "seed": cfg.seed,
        }, note)  # fmt: skip
        save_adapted(model, folder, card)
    accelerator.wait_for_everyone()
    return folder
