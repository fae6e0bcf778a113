"""Adapt a ControlNet to a new condition from a few examples: ~100 steps, full or LoRA.

    accelerate launch train/finetune.py [--config configs/finetune_tiny.yaml] [key=value ...]

With no arguments it fine-tunes the best measured start, checkpoints/joint-3x-controlnet-tiny, on 16 synthetic
``normal`` maps for 100 steps and writes a diffusers ControlNet folder to outputs/finetune-normal-full
(``outputs/finetune-{condition}-{mode}`` unless ``output_dir`` is given);
``controlnet_model_name_or_path=null`` starts from the standard ``from_unet`` initialisation instead,
the baseline every start is compared against. Under ``accelerate launch`` on several
GPUs this is plain data parallelism: every process draws its own batch of the same shots.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from torch.utils.data import Subset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacontrol.cache import attach_encodings  # noqa: E402
from metacontrol.configuration import ConfigError, config_argument_parser, load_config, save_config  # noqa: E402
from metacontrol.controlnet import create_controlnet, model_card  # noqa: E402
from metacontrol.data.datasets import ImageFolderDataset  # noqa: E402
from metacontrol.data.pools import DatasetTaskData, TaskData, synthetic_pools, warn_unknown_words  # noqa: E402
from metacontrol.errors import run_main  # noqa: E402
from metacontrol.finetune_config import FinetuneConfig  # noqa: E402
from metacontrol.lora import add_lora, controlnet_of, load_lora, save_adapted  # noqa: E402
from metacontrol.meta.freezing import freeze_table, set_requires_grad, trainable_parameters  # noqa: E402
from metacontrol.models.base import BaseModel  # noqa: E402
from metacontrol.objective import ControlNetObjective  # noqa: E402
from metacontrol.training import (  # noqa: E402
    NonFiniteLossError,
    TrainingProgress,
    configure_attention,
    flat_config,
    load_base_for_training,
    resolve_resume_path,
    save_training_state,
    setup_accelerator,
    stop_on_signals,
    weight_dtype_of,
)
from metacontrol.validation import log_validation  # noqa: E402

logger = logging.getLogger("finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__, "configs/finetune_tiny.yaml", "mode=lora shots=8")
    return parser.parse_intermixed_args(argv)


def few_shot_data(cfg: FinetuneConfig, base: BaseModel, show_progress: bool) -> TaskData:
    """``shots`` examples of the source from ``shot_offset`` on; too few fails here, before any training work."""
    if cfg.source == "synthetic":
        pools = synthetic_pools(cfg.world, [cfg.condition], cfg.shots, "train", show_progress, start=cfg.shot_offset)
        data: TaskData = pools[cfg.condition]
    else:
        root = Path(cfg.train_data_dir)
        root = root / cfg.condition if (root / cfg.condition).is_dir() else root
        dataset = ImageFolderDataset(root, cfg.condition, cfg.resolution, cfg.annotators,
                                     on_bad_sample=cfg.on_bad_sample, caption_column=cfg.caption_column)
        if len(dataset) < cfg.shot_offset + cfg.shots:
            raise ConfigError(f"shots: {cfg.shots} examples from shot_offset {cfg.shot_offset} asked for, but {root} "
                              f"has only {len(dataset)} usable samples ({len(dataset.skipped)} skipped as bad); "
                              "lower shots or shot_offset")
        data = DatasetTaskData(Subset(dataset, range(cfg.shot_offset, cfg.shot_offset + cfg.shots)))
    warn_unknown_words({cfg.condition: data}, base.tokenizer)
    if cfg.cache == "latents":
        attach_encodings({cfg.condition: data}, base, cache_dir=cfg.cache_dir, show_progress=show_progress)
    return data


def step_batch(cfg: FinetuneConfig, step: int, process: int) -> tuple[list[int], torch.Generator]:
    """Sample indices and loss RNG of a step: functions of (seed, step, process), so resume is exact."""
    index_seed, noise_seed = np.random.SeedSequence([cfg.seed, step, process]).spawn(2)
    indices = np.random.default_rng(index_seed).choice(cfg.shots, cfg.train_batch_size, replace=False)
    return [int(i) for i in indices], torch.Generator().manual_seed(int(noise_seed.generate_state(1)[0]))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    output_dir = Path(cfg.output_dir)
    accelerator = setup_accelerator(cfg)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)

    # -- models: frozen base, the initialisation (checked against the base), the few shots -----------
    base = load_base_for_training(cfg, weight_dtype, accelerator.device)
    controlnet = create_controlnet(base.unet, base.vae_scale_factor, cfg.controlnet_model_name_or_path)
    data = few_shot_data(cfg, base, accelerator.is_local_main_process)
    configure_attention(cfg, controlnet, base)
    controlnet.to(accelerator.device, dtype=torch.float32).train()
    total = sum(p.numel() for p in controlnet.parameters())

    # -- what trains: unfrozen parameters (full) or adapters + zero convolutions (lora) -------------
    if cfg.mode == "full":
        model: torch.nn.Module = controlnet
        params = trainable_parameters(controlnet, cfg.freeze, "freeze")
        set_requires_grad(controlnet, params)
        logger.info("ControlNet parameters:\n%s", freeze_table(controlnet, {"finetune": cfg.freeze}))
    else:
        model = (load_lora(controlnet, cfg.lora_init) if cfg.lora_init else
                 add_lora(controlnet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                          modules_to_save=cfg.lora_modules_to_save))
        params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    logger.info("%s: %s of %s ControlNet parameters train (%.1f%%)", cfg.mode, f"{trainable:,}", f"{total:,}",
                100 * trainable / total)

    # -- optimiser; prepared the standard way: one task, so DDP's gradient averaging is what we want ---
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    progress = TrainingProgress()  # its `meta_step` counts fine-tuning steps here
    accelerator.register_for_checkpointing(progress)
    resume = resolve_resume_path(cfg.resume_from_checkpoint, output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at step %d", resume, progress.meta_step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "finetune_config.yaml")
    accelerator.init_trackers("metacontrol-finetune", config=flat_config(cfg))

    def card(steps: int) -> str:
        start = f"from {cfg.lora_init}" if cfg.lora_init else f"rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank}"
        lora = f"lora ({start}; zero convolutions trained fully; adapter in lora/, merged here)"
        return model_card(f"metacontrol ControlNet for {cfg.condition}, adapted from {cfg.shots} examples", {
            "base model": cfg.pretrained_model_name_or_path,
            "initialisation": cfg.controlnet_model_name_or_path or "from_unet (standard ControlNet init)",
            "condition": cfg.condition,
            "shots": f"{cfg.shots} ({cfg.source if cfg.source == 'synthetic' else cfg.train_data_dir})",
            "steps": f"{steps} of {cfg.max_train_steps}",
            "mode": cfg.mode if cfg.mode == "full" else lora,
            "trainable parameters": f"{trainable:,} of {total:,}",
            "optimiser": f"AdamW lr {cfg.learning_rate} ({cfg.lr_scheduler}), betas ({cfg.adam_beta1}, "
                         f"{cfg.adam_beta2}), batch {cfg.train_batch_size} x "
                         f"{accelerator.num_processes} process(es)",
            "frozen": cfg.freeze,
            "resolution": cfg.resolution,
            "mixed precision": accelerator.mixed_precision,
            "seed": cfg.seed,
        })

    def unwrapped() -> torch.nn.Module:
        return accelerator.unwrap_model(model)

    # -- the fine-tuning loop --------------------------------------------------------------------------
    objective = ControlNetObjective(base, model, weight_dtype, accelerator.autocast)
    bar = tqdm(total=cfg.max_train_steps, initial=progress.meta_step,
               desc=f"finetune {cfg.condition} ({cfg.mode})", disable=not accelerator.is_local_main_process)
    start, first_step = time.time(), progress.meta_step
    restore_signals = stop_on_signals(progress, output_dir, "step")  # Ctrl-C says how to resume
    while progress.meta_step < cfg.max_train_steps:
        indices, generator = step_batch(cfg, progress.meta_step, accelerator.process_index)
        loss = objective.loss(data.batch(indices), generator)
        losses = accelerator.gather(loss.detach().reshape(1))  # every process sees a failure anywhere
        if not torch.isfinite(losses).all():
            where = f"loss is {loss.item()}" if not torch.isfinite(loss) else "a non-finite loss elsewhere"
            raise NonFiniteLossError(
                f"{where} at step {progress.meta_step + 1}, condition {cfg.condition!r}, sample indices "
                f"{indices} (process {accelerator.process_index}); stopped, the last checkpoint is kept")
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.meta_step += 1
        step = progress.meta_step
        bar.update(1)
        rate = (step - first_step) / (time.time() - start)
        logs = {"loss": losses.mean().item(), "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), "steps_per_second": rate}
        bar.set_postfix(loss=f"{logs['loss']:.3g}")
        accelerator.log(logs, step=step)

        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save_training_state(accelerator, output_dir, step, cfg.checkpoints_total_limit)
        if step in cfg.save_steps:
            if accelerator.is_main_process:
                save_adapted(unwrapped(), output_dir / f"step-{step}", card(step))
            accelerator.wait_for_everyone()
        if cfg.validation_steps and step % cfg.validation_steps == 0:
            log_validation(cfg, base, controlnet_of(unwrapped()), accelerator, step, {cfg.condition: data})
    bar.close()
    restore_signals()

    if accelerator.is_main_process:
        save_adapted(unwrapped(), output_dir, card(progress.meta_step))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        saved = ", ".join(f"step-{s}" for s in sorted(cfg.save_steps))
        print(f"finetune: {cfg.mode} on {cfg.shots} {cfg.condition} examples for {progress.meta_step} steps "
              f"in {time.time() - start:.0f} s from {cfg.controlnet_model_name_or_path or 'from_unet'}; "
              f"ControlNet: {output_dir} (load with ControlNetModel.from_pretrained)"
              + (f"; LoRA adapter: {output_dir / 'lora'}" if cfg.mode == "lora" else "")
              + (f"; also saved at {saved}" if saved else ""))
    return output_dir


if __name__ == "__main__":
    run_main(main, "finetune")
