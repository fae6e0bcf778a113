"""Pieces of the training scripts that are not the algorithm: setup, data, state, saving."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from accelerate.utils.constants import RNG_STATE_NAME

from metacontrol.checkpointing import SAVING_MARKER, atomic_directory, remove_stale_writes, set_aside
from metacontrol.config import MetaTrainConfig
from metacontrol.configuration import ConfigError, to_dict
from metacontrol.controlnet import model_card
from metacontrol.data.pools import DatasetTaskData, TaskData, synthetic_pools, warn_unknown_words
from metacontrol.data.sampler import Episode
from metacontrol.models.base import BaseModel, load_base_model

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss: the run stops, naming where, and the last good checkpoint stays as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM in a training loop; the message says where it stopped and how to go on."""

    def __init__(self, signum: int, step: int, unit: str, output_dir: Path) -> None:
        complete, _ = list_checkpoints(output_dir)
        saved = f"the last checkpoint is {complete[-1]}" if complete else "no checkpoint yet: resuming starts over"
        super().__init__(f"interrupted at {unit} {step} ({saved}); resume with resume_from_checkpoint=latest")
        self.exit_code = 128 + signum  # 130 for Ctrl-C, as shells report it


@dataclass
class TrainingProgress:
    """The loop position, saved with the accelerate state (the task sampler is a function of it)."""

    meta_step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"meta_step": self.meta_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.meta_step = int(state["meta_step"])


def stop_on_signals(progress: TrainingProgress, output_dir: Path, unit: str) -> Callable[[], None]:
    """Until the returned function is called, Ctrl-C and SIGTERM raise ``TrainingInterrupted`` at the current step.

    After the first signal both do nothing: ``accelerate launch`` answers a Ctrl-C by sending the
    script SIGTERM at once, and that must not cut the message short. (A handler that does nothing,
    not ``SIG_IGN``: a signal already on its way when ``SIG_IGN`` is set makes Python print a
    traceback.) Off the main thread, where Python cannot set handlers, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        for number in INTERRUPT_SIGNALS:
            signal.signal(number, lambda *_: None)
        raise TrainingInterrupted(signum, progress.meta_step, unit, output_dir)

    previous = {number: signal.signal(number, interrupt) for number in INTERRUPT_SIGNALS}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    return restore


def setup_accelerator(cfg: Any) -> Accelerator:
    """The Accelerator, logging, CPU threads and seed, set up the same way for every training script.

    Leftovers of an interrupted checkpoint write in ``output_dir`` are removed here.

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
    if accelerator.is_main_process:  # before any process writes there
        remove_stale_writes(output_dir)
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
                dataset = ImageFolderDataset(root, task, cfg.resolution, d.annotators, on_bad_sample=d.on_bad_sample,
                                             caption_column=d.caption_column)
            else:
                dataset = HuggingFaceDataset(root, cfg.resolution, d.image_column, d.conditioning_image_column,
                                             d.caption_column)
            data[task] = DatasetTaskData(dataset)
    warn_unknown_words(data, base.tokenizer)
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


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why accelerate cannot resume from ``checkpoint`` (None: it can): its RNG state and loop position.

    Our own writes are atomic, so this catches folders made, copied or emptied by hand.
    """
    if not any(checkpoint.iterdir()):
        return "empty"
    if not (checkpoint / f"{RNG_STATE_NAME}_0.pkl").is_file():
        return f"no {RNG_STATE_NAME}_0.pkl"
    if not any(checkpoint.glob("custom_checkpoint_*.pkl")):
        return "no custom_checkpoint_*.pkl (the loop position)"
    return None


def list_checkpoints(output_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``checkpoint-N`` folders of ``output_dir`` by step: the complete ones, and (folder, why) of the others."""
    found = sorted((int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
                   if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir())
    complete, incomplete = [], []
    for _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            complete.append(path)
        else:
            incomplete.append((path, reason))
    return complete, incomplete


def resolve_resume_path(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: a given folder, or the newest complete one for ``latest``."""
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"resume_from_checkpoint: {resume} is not a checkpoint folder")
        if reason := incomplete_reason(path):
            raise ConfigError(f"resume_from_checkpoint: {resume} is not a complete accelerate checkpoint ({reason})")
        return path
    complete, incomplete = list_checkpoints(output_dir)
    if incomplete:
        logger.warning("resume_from_checkpoint=latest: skipping incomplete checkpoint(s) %s",
                       "; ".join(f"{path} ({reason})" for path, reason in incomplete))
    if not complete:
        logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s, starting fresh", output_dir)
        return None
    return complete[-1]


def save_training_state(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder that is renamed into ``checkpoint-{step}``.

    Every process calls ``save_state`` (each writes its own RNG state) into the *same* temporary folder;
    only the main process renames it and prunes old checkpoints, after everyone has written.
    """
    target = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        with atomic_directory(target) as tmp:
            accelerator.wait_for_everyone()
            (output_dir / SAVING_MARKER).write_text(str(tmp))
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
        (output_dir / SAVING_MARKER).unlink()
        if total_limit is not None:  # incomplete folders are not ours to delete (and were warned about)
            for old in list_checkpoints(output_dir)[0][:-total_limit]:
                shutil.rmtree(set_aside(old), ignore_errors=True)
    else:
        accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()
        tmp = Path((output_dir / SAVING_MARKER).read_text())
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
