"""Pieces of the training scripts that are not the algorithm: setup, data, state, saving."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from metacontrol.checkpointing import atomic_directory
from metacontrol.config import MetaTrainConfig
from metacontrol.configuration import ConfigError, to_dict
from metacontrol.controlnet import model_card
from metacontrol.data.pools import DatasetTaskData, TaskData, synthetic_pools
from metacontrol.data.sampler import Episode
from metacontrol.models.base import BaseModel, load_base_model

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss: the run stops, naming where, and the last good checkpoint stays as it was."""


@dataclass
class TrainingProgress:
    """The loop position, saved with the accelerate state (the task sampler is a function of it)."""

    meta_step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"meta_step": self.meta_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.meta_step = int(state["meta_step"])


def setup_accelerator(cfg: Any) -> Accelerator:
    """The Accelerator, logging, CPU threads and seed, set up the same way for every training script.

    ``cfg`` needs ``output_dir``, ``logging_dir``, ``mixed_precision``, ``report_to``, ``num_threads``, ``seed``.
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
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    return accelerator


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def checked_loss(loss: torch.Tensor, episode: Episode, meta_step: int, phase: int, indices) -> torch.Tensor:
    if not torch.isfinite(loss):
        where = "query batch" if phase < 0 else f"inner step {phase}"
        raise NonFiniteLossError(f"loss is {loss.item()} at meta-step {meta_step}, task {episode.task!r}, {where}, "
                                 f"sample indices {list(indices)}; the run stopped and the last checkpoint is kept")
    return loss


def load_base_for_training(cfg: MetaTrainConfig, weight_dtype: torch.dtype, device: torch.device) -> BaseModel:
    """Load, validate against the config, freeze and cast the base model, before any data work."""
    base = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision)
    if cfg.resolution % base.vae_scale_factor:
        raise ConfigError(f"resolution: {cfg.resolution} is not divisible by the VAE's downsampling factor "
                          f"{base.vae_scale_factor} of {cfg.pretrained_model_name_or_path}")
    return base.freeze(weight_dtype, device)


def configure_attention(cfg: MetaTrainConfig, controlnet: torch.nn.Module, base: BaseModel) -> None:
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


def build_task_data(cfg: MetaTrainConfig, base: BaseModel, accelerator: Accelerator) -> dict[str, TaskData]:
    """One TaskData per task from the configured source, with cached encodings if ``cache: latents``."""
    from metacontrol.cache import attach_encodings  # noqa: PLC0415  (keeps this module import-light)
    from metacontrol.data.datasets import HuggingFaceDataset, ImageFolderDataset  # noqa: PLC0415

    d = cfg.data
    if d.source == "synthetic":
        data: dict[str, TaskData] = dict(synthetic_pools(d.world, d.tasks, d.pool_size, "train",
                                                         show_progress=accelerator.is_local_main_process))
    else:
        data = {}
        for task in d.tasks:
            root = Path(d.train_data_dir) / task if (Path(d.train_data_dir) / task).is_dir() else Path(d.train_data_dir)
            if d.source == "imagefolder":
                dataset = ImageFolderDataset(root, task, cfg.resolution, d.annotators, on_bad_sample=d.on_bad_sample)
            else:
                dataset = HuggingFaceDataset(root, cfg.resolution, d.image_column, d.conditioning_image_column,
                                             d.caption_column)
            data[task] = DatasetTaskData(dataset)
    if cfg.cache == "latents":
        attach_encodings(data, base, cache_dir=cfg.cache_dir, show_progress=accelerator.is_local_main_process)
    return data


def flat_config(cfg: Any) -> dict[str, Any]:
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


def resolve_resume_path(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"resume_from_checkpoint: {resume} is not a checkpoint folder")
        return path
    found = sorted((int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
                   if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir())
    if not found:
        logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh", output_dir)
        return None
    return found[-1][1]


def save_training_state(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder that is renamed into ``checkpoint-{step}``.

    Every process calls ``save_state`` (each writes its own RNG state) into the *same* temporary folder;
    only the main process renames it and prunes old checkpoints, after everyone has written.
    """
    target = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        with atomic_directory(target) as tmp:
            accelerator.wait_for_everyone()
            (output_dir / ".saving").write_text(str(tmp))
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
        (output_dir / ".saving").unlink()
        if total_limit is not None:
            olds = sorted((int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
                          if (m := CHECKPOINT_PATTERN.match(p.name)))
            for _, old in olds[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    else:
        accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()
        tmp = Path((output_dir / ".saving").read_text())
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    return target


def save_final_controlnet(cfg: MetaTrainConfig, model: torch.nn.Module, accelerator: Accelerator,
                          meta_steps: int, last_logs: dict[str, float]) -> Path:
    """The ControlNet (LoRA: merged, adapter in ``lora/``) with a card stating how it was made and at what budget."""
    from metacontrol.lora import save_adapted  # noqa: PLC0415  (peft only when saving)

    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        m = cfg.meta
        samples, steps = m.data_budget()
        start = cfg.controlnet_model_name_or_path
        card = model_card(
            f"metacontrol {m.algorithm} ControlNet initialisation",
            {
                "base model": cfg.pretrained_model_name_or_path,
                "tasks (conditions)": ", ".join(cfg.data.tasks),
                "data": cfg.data.source if cfg.data.source != "synthetic" else
                f"synthetic world, {cfg.data.pool_size} scenes per task, {cfg.resolution} px",
                "algorithm": m.algorithm + (f", LoRA start (rank {m.lora_rank}, alpha {m.lora_alpha or m.lora_rank}; "
                                            "adapters + zero convolutions train, adapter in lora/, merged here)"
                                            if m.lora_rank else ""),
                "started from": start or "from_unet (standard ControlNet initialisation)",
                "data budget": f"{samples:,} samples, {steps}" + (f" (on top of {start}'s own)" if start else ""),
                "meta-steps": meta_steps,
                "tasks per meta-step": m.tasks_per_meta_step,
                "inner loop": f"{m.inner_steps} x {m.inner_optimizer} lr {m.inner_learning_rate}"
                              + (f" betas {tuple(m.inner_betas)}" if m.inner_optimizer == "adam" else "")
                              + f", batch {m.support_batch_size}",
                "outer loop": f"{m.outer_optimizer} lr {m.outer_learning_rate} ({m.lr_scheduler})",
                "frozen (inner / outer)": f"{cfg.freeze.inner} / {cfg.freeze.outer}",
                "mixed precision": accelerator.mixed_precision,
                "seed": cfg.seed,
                **{f"last meta-step: {k}": f"{v:.4g}" for k, v in sorted(last_logs.items()) if "loss" in k},
            },
            "This is an *initialisation*: fine-tune it on a new condition with `train/finetune.py` "
            "(about 100 steps); edge-like conditions may work zero-shot. Metrics: see `train/evaluate.py` and "
            "BENCHMARKS.md of metacontrol.\n\n",
        )
        save_adapted(model, output_dir, card)
    accelerator.wait_for_everyone()
    return output_dir
