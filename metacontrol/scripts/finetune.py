"""Adapt a ControlNet to a new condition from a few examples: ~100 steps, full or LoRA.

    accelerate launch train/finetune.py [--config configs/finetune_tiny.yaml] [key=value ...]
    metacontrol finetune [--config configs/finetune_tiny.yaml] [key=value ...]

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
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from metacontrol.checkpointing import TrainingProgress, TrainingState, save_training_state, stop_on_signals
from metacontrol.config import SCRIPT_CONFIGS, FinetuneConfig
from metacontrol.config_loader import config_argument_parser, load_config
from metacontrol.data.loader import StepPlan, planned_batches
from metacontrol.data.sources import load_task_data
from metacontrol.freezing import freeze_table, set_requires_grad, trainable_parameters
from metacontrol.lora import add_lora, controlnet_of, load_lora
from metacontrol.objective import ControlNetObjective, check_finite
from metacontrol.optimizers import adam_class
from metacontrol.processes import agreed
from metacontrol.run import resume_or_start, save_result, set_up_run
from metacontrol.validation import drop_text_encoders, log_validation, validation_samples

logger = logging.getLogger("finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__, SCRIPT_CONFIGS["finetune"][1], "mode=lora shots=8")
    return parser.parse_intermixed_args(argv)


def step_batch(cfg: FinetuneConfig, step: int, process: int) -> tuple[list[int], torch.Generator]:
    """Sample indices and loss RNG of a step: functions of (seed, step, process), so resume is exact."""
    index_seed, noise_seed = np.random.SeedSequence([cfg.seed, step, process]).spawn(2)
    indices = np.random.default_rng(index_seed).choice(cfg.shots, cfg.train_batch_size, replace=False)
    return [int(i) for i in indices], torch.Generator().manual_seed(int(noise_seed.generate_state(1)[0]))


def step_plan(cfg: FinetuneConfig, step: int, process: int) -> StepPlan:
    """A step's one batch, for ``planned_batches`` to read ahead."""
    return {"batch": (cfg.condition, step_batch(cfg, step, process)[0])}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    output_dir = Path(cfg.output_dir)
    run = set_up_run(cfg)  # accelerator, frozen base in the weight dtype, the initialisation in fp32
    accelerator, base, controlnet = run.accelerator, run.base, run.controlnet

    # -- the few shots: the first `shots` examples of the source from `shot_offset` on --------------------
    data = load_task_data(cfg, [cfg.condition], cfg.resolution, base, cache=cfg.cache, cache_dir=cfg.cache_dir,
                          show_progress=accelerator.is_local_main_process, count=cfg.shots, start=cfg.shot_offset)
    validating = cfg.validation_steps > 0 and accelerator.is_main_process  # only the main process draws grids
    samples = validation_samples(cfg, data, cfg.num_validation_images, cfg.resolution) if validating else {}
    if cfg.free_text_encoders:  # every prompt is encoded now (cache, validation captions)
        drop_text_encoders(base, samples)

    # -- what trains: unfrozen parameters (full) or adapters + zero convolutions (lora) -------------
    total = sum(p.numel() for p in controlnet.parameters())
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
    optimizer = adam_class(cfg.use_8bit_adam, True)(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                    weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # Without accelerate's fp32 output wrapper: the objective autocasts and casts the residuals itself, and
    # the wrapper would hand fp32 residuals to the bf16/fp16 UNet in validation pipelines.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    progress = TrainingProgress()
    state = TrainingState(unwrapped, params, optimizer, lr_scheduler, progress, accelerator.scaler)
    resume_or_start(cfg, accelerator, state, config_name="finetune_config.yaml", project="metacontrol-finetune",
                    unit="step")

    def save(folder: Path, steps: int) -> Path:
        lora_start = (f"from {cfg.lora_init}" if cfg.lora_init else
                      f"rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank}")
        return save_result(accelerator, unwrapped, folder, cfg,
                           f"metacontrol ControlNet for {cfg.condition}, adapted from {cfg.shots} examples", {
            "condition": cfg.condition,
            "shots": f"{cfg.shots} ({cfg.source if cfg.source == 'synthetic' else cfg.train_data_dir})",
            "steps": f"{steps} of {cfg.max_train_steps}",
            "mode": cfg.mode if cfg.mode == "full" else
            f"lora ({lora_start}; zero convolutions trained fully; adapter in lora/, merged here)",
            "trainable parameters": f"{trainable:,} of {total:,}",
            "optimiser": f"AdamW lr {cfg.learning_rate} ({cfg.lr_scheduler}), betas ({cfg.adam_beta1}, "
                         f"{cfg.adam_beta2}), batch {cfg.train_batch_size} x {accelerator.num_processes} process(es)",
            "frozen": cfg.freeze,
        }, family=base.family)  # fmt: skip

    # -- the fine-tuning loop --------------------------------------------------------------------------
    objective = ControlNetObjective(base, model, run.weight_dtype, accelerator.autocast)
    bar = tqdm(total=cfg.max_train_steps, initial=progress.step,
               desc=f"finetune {cfg.condition} ({cfg.mode})", disable=not accelerator.is_local_main_process)
    start, first_step = time.time(), progress.step
    restore_signals = stop_on_signals(progress, output_dir, "step")  # Ctrl-C says how to resume
    # The steps' batches, read ahead by `dataloader_num_workers` workers in the order used below.
    reads = planned_batches(data, partial(step_plan, cfg, process=accelerator.process_index), progress.step,
                            cfg.max_train_steps, cfg.dataloader_num_workers, cfg.dataloader_prefetch_factor)
    while progress.step < cfg.max_train_steps:
        indices, generator = step_batch(cfg, progress.step, accelerator.process_index)
        with agreed(accelerator, f"step {progress.step + 1}"):  # before backward's all-reduce
            loss = check_finite(objective.loss(next(reads)["batch"], generator),
                                f"step {progress.step + 1}, condition {cfg.condition!r}, sample indices {indices} "
                                f"(process {accelerator.process_index})")
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        step = progress.step
        bar.update(1)
        logs = {"loss": accelerator.reduce(loss.detach(), reduction="mean").item(),
                "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "steps_per_second": (step - first_step) / (time.time() - start)}
        bar.set_postfix(loss=f"{logs['loss']:.3g}")
        accelerator.log(logs, step=step)

        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save_training_state(accelerator, output_dir, state, cfg.checkpoints_total_limit)
        if step in cfg.save_steps:
            save(output_dir / f"step-{step}", step)
        if cfg.validation_steps and step % cfg.validation_steps == 0:
            log_validation(accelerator, base, controlnet_of(unwrapped), samples, step,
                           output_dir, seed=cfg.seed, inference_steps=cfg.validation_inference_steps)
    bar.close()
    restore_signals()

    save(output_dir, progress.step)
    accelerator.end_training()
    if accelerator.is_main_process:
        saved = ", ".join(f"step-{s}" for s in sorted(cfg.save_steps))
        print(f"finetune: {cfg.mode} on {cfg.shots} {cfg.condition} examples for {progress.step} steps "
              f"in {time.time() - start:.0f} s from {cfg.controlnet_model_name_or_path or 'from_unet'}; "
              f"ControlNet: {output_dir} (load with ControlNetModel.from_pretrained)"
              + (f"; LoRA adapter: {output_dir / 'lora'}" if cfg.mode == "lora" else "")
              + (f"; also saved at {saved}" if saved else ""))
    return output_dir
