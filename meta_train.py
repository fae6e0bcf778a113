"""Meta-train a ControlNet initialisation over several condition tasks (Reptile, FOMAML or joint).

    accelerate launch meta_train.py [--config configs/meta_tiny.yaml] [key=value ...]

With no arguments it meta-trains against the embedded tiny base model on the synthetic world
(canny, hed, depth, pose) and writes a diffusers ControlNet folder to outputs/meta-controlnet-tiny.
The loop below is the whole algorithm; the pieces it calls each do one job.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from metacontrol.config import MetaTrainConfig
from metacontrol.configuration import config_argument_parser, load_config, save_config
from metacontrol.controlnet import create_controlnet
from metacontrol.data.sampler import TaskSampler
from metacontrol.errors import run_main
from metacontrol.lora import add_lora, controlnet_of
from metacontrol.meta.algorithms import MetaLearner
from metacontrol.meta.freezing import freeze_table, set_requires_grad, trainable_parameters
from metacontrol.objective import ControlNetObjective
from metacontrol.training import (
    NonFiniteLossError,
    TrainingProgress,
    build_task_data,
    checked_loss,
    configure_attention,
    flat_config,
    load_base_for_training,
    resolve_resume_path,
    save_final_controlnet,
    save_training_state,
    setup_accelerator,
    stop_on_signals,
    weight_dtype_of,
)
from metacontrol.validation import log_validation

logger = logging.getLogger("meta_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__, "configs/meta_tiny.yaml", "meta.algorithm=fomaml")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = load_config(MetaTrainConfig, args.config, args.overrides)
    output_dir = Path(cfg.output_dir)
    accelerator = setup_accelerator(cfg)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)

    # -- models: frozen base in the weight dtype, trainable ControlNet in fp32 ----------------------
    base = load_base_for_training(cfg, weight_dtype, accelerator.device)
    controlnet = create_controlnet(base.unet, base.vae_scale_factor, cfg.controlnet_model_name_or_path)
    configure_attention(cfg, controlnet, base)
    controlnet.to(accelerator.device, dtype=torch.float32).train()
    if cfg.meta.lora_rank:  # a meta-learned LoRA start: only adapters and zero convolutions train, in both loops
        model: torch.nn.Module = add_lora(controlnet, rank=cfg.meta.lora_rank, alpha=cfg.meta.lora_alpha)
        inner_params = outer_params = [p for p in model.parameters() if p.requires_grad]
        logger.info("LoRA rank %d: %s of %s parameters train", cfg.meta.lora_rank,
                    f"{sum(p.numel() for p in inner_params):,}", f"{sum(p.numel() for p in controlnet.parameters()):,}")
    else:
        model = controlnet
        inner_params = trainable_parameters(controlnet, cfg.freeze.inner, "freeze.inner")
        outer_params = trainable_parameters(controlnet, cfg.freeze.outer, "freeze.outer")
        set_requires_grad(controlnet, inner_params + outer_params)  # frozen in both phases: no backward, no .grad
        logger.info("ControlNet parameters per phase:\n%s",
                    freeze_table(controlnet, {"inner": cfg.freeze.inner, "outer": cfg.freeze.outer}))

    # -- data, episodes, objective --------------------------------------------------------------------
    data = build_task_data(cfg, base, accelerator)
    sampler = TaskSampler(cfg.data.tasks, {t: len(d) for t, d in data.items()}, cfg.meta.tasks_per_meta_step,
                          cfg.meta.inner_steps, cfg.meta.support_batch_size, cfg.meta.query_batch_size, cfg.seed,
                          accelerator.process_index, accelerator.num_processes)
    objective = ControlNetObjective(base, model, weight_dtype, accelerator.autocast)
    grad_scaler = torch.amp.GradScaler(accelerator.device.type) if accelerator.mixed_precision == "fp16" else None
    learner = MetaLearner(inner_params, outer_params, cfg.meta.algorithm, cfg.meta.inner_optimizer,
                          cfg.meta.inner_learning_rate, cfg.meta.max_grad_norm, grad_scaler,
                          inner_betas=tuple(cfg.meta.inner_betas))
    reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None

    # -- outer optimiser (the only optimiser for `joint`) ---------------------------------------------
    joint = cfg.meta.algorithm == "joint"
    optimizer_steps = cfg.meta.max_meta_steps * (cfg.meta.inner_steps if joint else 1)
    if cfg.meta.outer_optimizer == "sgd":
        outer_optimizer = torch.optim.SGD(outer_params, lr=cfg.meta.outer_learning_rate,
                                          weight_decay=cfg.meta.outer_weight_decay)
    else:
        outer_optimizer = torch.optim.AdamW(outer_params, lr=cfg.meta.outer_learning_rate,
                                            weight_decay=cfg.meta.outer_weight_decay)
    lr_scheduler = get_scheduler(cfg.meta.lr_scheduler, outer_optimizer, num_warmup_steps=cfg.meta.lr_warmup_steps,
                                 num_training_steps=optimizer_steps)
    progress = TrainingProgress()
    # Not `prepare`d on purpose: DDP would all-reduce the inner loop's gradients across *different*
    # tasks. The meta-gradient is averaged by hand, once per meta-step (MetaLearner.finish).
    for obj in (model, outer_optimizer, lr_scheduler, progress):
        accelerator.register_for_checkpointing(obj)

    resume = resolve_resume_path(cfg.resume_from_checkpoint, output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at meta-step %d", resume, progress.meta_step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "meta_train_config.yaml")
    accelerator.init_trackers("metacontrol", config=flat_config(cfg))

    # -- the meta-training loop -----------------------------------------------------------------------
    def batch_loss(episode, indices, phase: int):
        """The loss of one batch of an episode; its noise is seeded by (seed, meta-step, slot, phase)."""
        def compute() -> torch.Tensor:
            generator = torch.Generator().manual_seed(episode.seed(phase))
            loss = objective.loss(data[episode.task].batch(indices), generator)
            return checked_loss(loss, episode, progress.meta_step, phase, indices)
        return compute

    bar = tqdm(total=cfg.meta.max_meta_steps, initial=progress.meta_step, desc=f"meta-train ({cfg.meta.algorithm})",
               disable=not accelerator.is_local_main_process)
    start, first_step = time.time(), progress.meta_step
    logs: dict[str, float] = {}
    restore_signals = stop_on_signals(progress, output_dir, "meta-step")  # Ctrl-C says how to resume
    while progress.meta_step < cfg.meta.max_meta_steps:
        episodes = sampler.episodes(progress.meta_step)
        logs = {}
        failure: FloatingPointError | None = None  # a NonFiniteLossError, or a gradient overflowing at scale 1
        try:
            if joint:  # inner_steps plain steps, each on one batch of every task: same data budget
                for k in range(cfg.meta.inner_steps):
                    losses = learner.joint_step([batch_loss(e, e.support[k], k) for e in episodes],
                                                cfg.meta.tasks_per_meta_step, reduce_sum)
                    grad_norm = torch.nn.utils.clip_grad_norm_(outer_params, cfg.meta.max_grad_norm or math.inf)
                    outer_optimizer.step()
                    lr_scheduler.step()
                    outer_optimizer.zero_grad(set_to_none=True)
                    for e, loss in zip(episodes, losses):
                        logs[f"loss/{e.task}"] = loss
            else:
                learner.begin()
                for e in episodes:
                    inner = learner.adapt([batch_loss(e, batch, k) for k, batch in enumerate(e.support)])
                    query = learner.accumulate(batch_loss(e, e.query, -1) if cfg.meta.algorithm == "fomaml" else None)
                    logs[f"inner_loss/{e.task}"] = sum(inner) / len(inner)
                    if query is not None:
                        logs[f"query_loss/{e.task}"] = query
        except FloatingPointError as err:
            learner.snapshot.restore()
            failure = err
        # Every process learns of a failure anywhere before the collective below (no deadlock).
        failed = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
        if (reduce_sum(failed) if reduce_sum else failed).item() > 0:
            raise failure or NonFiniteLossError("a non-finite loss on another process stopped the run")
        if not joint:
            learner.finish(cfg.meta.tasks_per_meta_step, reduce_sum)
            grad_norm = torch.nn.utils.clip_grad_norm_(outer_params, cfg.meta.max_grad_norm or math.inf)
            outer_optimizer.step()
            lr_scheduler.step()
            outer_optimizer.zero_grad(set_to_none=True)
        progress.meta_step += 1
        bar.update(1)
        logs.update({"meta_grad_norm": float(grad_norm), "lr/outer": lr_scheduler.get_last_lr()[0],
                     "steps_per_second": (progress.meta_step - first_step) / (time.time() - start)})
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if "loss" in k})
        accelerator.log(logs, step=progress.meta_step)

        if progress.meta_step % cfg.checkpointing_steps == 0 or progress.meta_step == cfg.meta.max_meta_steps:
            save_training_state(accelerator, output_dir, progress.meta_step, cfg.checkpoints_total_limit)
        if cfg.validation_steps and progress.meta_step % cfg.validation_steps == 0:
            log_validation(cfg, base, controlnet_of(model), accelerator, progress.meta_step, data)
    bar.close()
    restore_signals()

    final = save_final_controlnet(cfg, model, accelerator, progress.meta_step, logs)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"meta_train: {cfg.meta.algorithm} over {', '.join(cfg.data.tasks)} for {progress.meta_step} meta-steps "
              f"in {(time.time() - start) / 60:.1f} min; ControlNet: {final} (load with "
              f"ControlNetModel.from_pretrained); state: {output_dir}/checkpoint-*; logs: {output_dir / cfg.logging_dir}")
    return final


if __name__ == "__main__":
    run_main(main, "meta_train")
