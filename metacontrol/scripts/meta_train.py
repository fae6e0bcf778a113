"""Meta-train a ControlNet initialisation over several condition tasks (Reptile, FOMAML, joint or LoRA-ML).

    accelerate launch meta_train.py [--config configs/meta_tiny.yaml] [key=value ...]
    metacontrol meta-train [--config configs/meta_tiny.yaml] [key=value ...]

With no arguments it meta-trains against the embedded tiny base model on the synthetic world
(canny, hed, depth, pose) and writes a diffusers ControlNet folder to outputs/meta-controlnet-tiny.
The loop below is the whole algorithm; the pieces it calls each do one job.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from metacontrol.checkpointing import TrainingProgress, TrainingState, save_training_state, stop_on_signals
from metacontrol.conditions import task_list
from metacontrol.config import SCRIPT_CONFIGS, MetaTrainConfig
from metacontrol.config_loader import config_argument_parser, load_config
from metacontrol.data.loader import planned_batches
from metacontrol.data.sources import load_task_data
from metacontrol.freezing import freeze_table, set_requires_grad, trainable_parameters
from metacontrol.lora import add_lora, controlnet_of
from metacontrol.meta.algorithms import MetaLearner, outer_step
from metacontrol.meta.episodes import TaskSampler, episode_loss
from metacontrol.meta.task_loras import TaskLoRAs, with_task_adapter
from metacontrol.objective import ControlNetObjective
from metacontrol.optimizers import adam_class
from metacontrol.processes import agreed, mean_over_processes
from metacontrol.run import resume_or_start, save_result, set_up_run
from metacontrol.validation import drop_text_encoders, log_validation, validation_samples

logger = logging.getLogger("meta_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__, SCRIPT_CONFIGS["meta_train"][1], "meta.algorithm=fomaml")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg = load_config(MetaTrainConfig, args.config, args.overrides)
    m = cfg.meta
    output_dir = Path(cfg.output_dir)
    run = set_up_run(cfg)  # accelerator, frozen base in the weight dtype, ControlNet in fp32
    accelerator, base, controlnet = run.accelerator, run.base, run.controlnet

    # -- what trains in which phase --------------------------------------------------------------------
    if m.lora_rank and m.algorithm != "lora_ml":  # a meta-learned LoRA start: adapters and zero convs train
        model: torch.nn.Module = add_lora(controlnet, rank=m.lora_rank, alpha=m.lora_alpha)
        inner_params = outer_params = [p for p in model.parameters() if p.requires_grad]
        logger.info("LoRA rank %d: %s of %s parameters train", m.lora_rank,
                    f"{sum(p.numel() for p in inner_params):,}", f"{sum(p.numel() for p in controlnet.parameters()):,}")
    else:
        model = controlnet
        inner_params = trainable_parameters(controlnet, cfg.freeze.inner, "freeze.inner")
        outer_params = trainable_parameters(controlnet, cfg.freeze.outer, "freeze.outer")
        set_requires_grad(controlnet, inner_params + outer_params)  # frozen in both phases: no backward, no .grad
        logger.info("ControlNet parameters per phase:\n%s",
                    freeze_table(controlnet, {"inner": cfg.freeze.inner, "outer": cfg.freeze.outer}))
    task_adapters, adapter_params = None, []
    if m.algorithm == "lora_ml":  # one adapter per task trains beside the shared ControlNet, which alone ships
        task_adapters = TaskLoRAs(controlnet, cfg.data.tasks, rank=m.lora_rank, alpha=m.lora_alpha, seed=cfg.seed)
        adapter_params = list(task_adapters.parameters())
        logger.info("LoRA-ML: a rank-%d adapter per task on %d layers, %s parameters for %d tasks", m.lora_rank,
                    len(task_adapters.layer_names), f"{sum(p.numel() for p in adapter_params):,}", len(cfg.data.tasks))
    updated = outer_params + adapter_params  # what the outer optimiser steps

    # -- data, episodes, objective --------------------------------------------------------------------
    data = load_task_data(cfg.data, cfg.data.tasks, cfg.resolution, base, cache=cfg.cache, cache_dir=cfg.cache_dir,
                          show_progress=accelerator.is_local_main_process,
                          count=cfg.data.pool_size if cfg.data.source == "synthetic" else None)
    validating = cfg.validation_steps > 0 and accelerator.is_main_process  # only the main process draws grids
    samples = validation_samples(cfg.data, data, cfg.num_validation_images, cfg.resolution) if validating else {}
    if cfg.free_text_encoders:  # every prompt is encoded now (cache, validation captions)
        drop_text_encoders(base, samples)
    sampler = TaskSampler(tasks=cfg.data.tasks, pool_sizes={t: len(d) for t, d in data.items()},
                          tasks_per_step=m.tasks_per_meta_step, inner_steps=m.inner_steps,
                          support_batch_size=m.support_batch_size, query_batch_size=m.query_batch_size,
                          seed=cfg.seed, process_index=accelerator.process_index,
                          num_processes=accelerator.num_processes)
    objective = ControlNetObjective(base, model, run.weight_dtype, accelerator.autocast)
    grad_scaler = torch.amp.GradScaler(accelerator.device.type) if accelerator.mixed_precision == "fp16" else None
    joint = m.algorithm in ("joint", "lora_ml")  # plain steps on every task's batch, no inner loop
    learner = MetaLearner(inner_params, updated, algorithm="joint" if joint else m.algorithm,
                          inner_optimizer=m.inner_optimizer,
                          inner_learning_rate=m.inner_learning_rate, max_grad_norm=m.max_grad_norm,
                          grad_scaler=grad_scaler, inner_betas=tuple(m.inner_betas), use_8bit_adam=cfg.use_8bit_adam)
    reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None

    # -- outer optimiser (the only optimiser for `joint` and `lora_ml`) ---------------------------------
    optimizer_steps = m.max_meta_steps * (m.inner_steps if joint else 1)
    optimizer_class = torch.optim.SGD if m.outer_optimizer == "sgd" else adam_class(cfg.use_8bit_adam, True)
    groups = [{"params": outer_params}]
    if adapter_params:  # LoRA learns at about 10x full training's rate (diffusers' LoRA examples)
        groups.append({"params": adapter_params, "lr": m.lora_learning_rate or m.outer_learning_rate})
    outer_optimizer = optimizer_class(groups, lr=m.outer_learning_rate, weight_decay=m.outer_weight_decay)
    lr_scheduler = get_scheduler(m.lr_scheduler, outer_optimizer, num_warmup_steps=m.lr_warmup_steps,
                                 num_training_steps=optimizer_steps)
    progress = TrainingProgress()
    # Not `prepare`d on purpose: DDP would all-reduce the inner loop's gradients across *different*
    # tasks. The meta-gradient is averaged by hand, once per meta-step (MetaLearner.finish).
    trained = model if task_adapters is None else torch.nn.ModuleDict({"controlnet": model, "task_adapters": task_adapters})
    state = TrainingState(trained, list(dict.fromkeys(inner_params + updated)), outer_optimizer, lr_scheduler,
                          progress, grad_scaler)
    resume_or_start(cfg, accelerator, state, config_name="meta_train_config.yaml", project="metacontrol",
                    unit="meta-step")
    # Logged losses are means over every task of every process: the same keys on each.
    loss_keys = [key for kind in ("loss", "inner_loss", "query_loss")
                 for key in (kind, *(f"{kind}/{task}" for task in cfg.data.tasks))]

    # -- the meta-training loop -----------------------------------------------------------------------
    bar = tqdm(total=m.max_meta_steps, initial=progress.step, desc=f"meta-train ({m.algorithm})",
               disable=not accelerator.is_local_main_process)
    start, first_step = time.time(), progress.step
    logs: dict[str, float] = {}
    restore_signals = stop_on_signals(progress, output_dir, "meta-step")  # Ctrl-C says how to resume
    # The meta-steps' batches, read ahead by `dataloader_num_workers` workers in the order used below.
    reads = planned_batches(data, partial(sampler.batches_of_step, query=m.algorithm == "fomaml"), progress.step,
                            m.max_meta_steps, cfg.dataloader_num_workers, cfg.dataloader_prefetch_factor)
    while progress.step < m.max_meta_steps:
        episodes = sampler.episodes(progress.step)
        losses: dict[str, list[float]] = {key: [] for key in loss_keys}
        where = f"meta-step {progress.step}"  # 0-based, as episodes name it
        with agreed(accelerator, where):  # a bad sample stops every process, not only the one that read it
            batches = next(reads)
        if joint:  # inner_steps plain steps, each on one batch of every task: same data budget
            for k in range(m.inner_steps):
                with agreed(accelerator, where):  # every process learns of a failure before the all-reduce
                    for e, loss in zip(episodes, learner.joint_gradients(
                            [with_task_adapter(task_adapters, e.task, episode_loss(objective, batches[e.slot, k], e, k))
                             for e in episodes])):
                        losses["loss"].append(loss)
                        losses[f"loss/{e.task}"].append(loss)
                learner.finish(m.tasks_per_meta_step, reduce_sum)
                if task_adapters is not None:  # only the adapters of this step's tasks (of every process) step
                    task_adapters.release_grads(sampler.tasks_for_step(progress.step))
                grad_norm = outer_step(outer_optimizer, lr_scheduler, updated, m.max_grad_norm)
        else:
            with agreed(accelerator, where):
                learner.begin()
                for e in episodes:
                    inner = learner.adapt([episode_loss(objective, batches[e.slot, k], e, k)
                                           for k in range(m.inner_steps)])
                    query = learner.accumulate(episode_loss(objective, batches[e.slot, -1], e, -1)
                                               if m.algorithm == "fomaml" else None)
                    for key in ("inner_loss", f"inner_loss/{e.task}"):
                        losses[key].append(sum(inner) / len(inner))
                    if query is not None:
                        losses["query_loss"].append(query)
                        losses[f"query_loss/{e.task}"].append(query)
            learner.finish(m.tasks_per_meta_step, reduce_sum)
            grad_norm = outer_step(outer_optimizer, lr_scheduler, updated, m.outer_max_grad_norm)
        progress.step += 1
        bar.update(1)
        logs = {**mean_over_processes(accelerator, losses), "meta_grad_norm": grad_norm,
                "lr/outer": lr_scheduler.get_last_lr()[0],
                "steps_per_second": (progress.step - first_step) / (time.time() - start)}
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "inner_loss", "query_loss")})
        accelerator.log(logs, step=progress.step)

        if progress.step % cfg.checkpointing_steps == 0 or progress.step == m.max_meta_steps:
            save_training_state(accelerator, output_dir, state, cfg.checkpoints_total_limit)
        if cfg.validation_steps and progress.step % cfg.validation_steps == 0:
            log_validation(accelerator, base, controlnet_of(model), samples, progress.step, output_dir,
                           seed=cfg.seed, inference_steps=cfg.validation_inference_steps)
    bar.close()
    restore_signals()

    final = save_result(accelerator, model, output_dir, cfg, f"metacontrol {m.algorithm} ControlNet initialisation",
                        card_rows(cfg, progress.step, logs),
                        "This is an *initialisation*: fine-tune it on a new condition with `train/finetune.py` "
                        "(about 100 steps); edge-like conditions may work zero-shot. Metrics: see "
                        "`train/evaluate.py` and BENCHMARKS.md of metacontrol.\n\n", base.family)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"meta_train: {m.algorithm} over {task_list(cfg.data.tasks)} for {progress.step} meta-steps "
              f"in {(time.time() - start) / 60:.1f} min; ControlNet: {final} (load with "
              f"ControlNetModel.from_pretrained); state: {output_dir}/checkpoint-*; logs: {output_dir / cfg.logging_dir}")
    return final


def card_rows(cfg: MetaTrainConfig, meta_steps: int, last_logs: dict[str, float]) -> dict[str, object]:
    """How the initialisation was made and at what data budget, for its model card."""
    m = cfg.meta
    samples, steps = m.data_budget()
    start = cfg.controlnet_model_name_or_path
    return {
        "tasks (conditions)": task_list(cfg.data.tasks, shown=20),
        "data": cfg.data.source if cfg.data.source != "synthetic" else
        f"synthetic world, {cfg.data.pool_size} scenes per task, {cfg.resolution} px",
        "algorithm": m.algorithm + (f", LoRA start (rank {m.lora_rank}, alpha {m.lora_alpha or m.lora_rank}; "
                                    "adapters + zero convolutions train, adapter in lora/, merged here)"
                                    if m.lora_rank and m.algorithm != "lora_ml" else "")
                     + (f" (LoRA-ML: a rank-{m.lora_rank} adapter per task trained beside this ControlNet, which "
                        "alone is saved; a new condition starts a fresh LoRA on it)" if m.algorithm == "lora_ml" else ""),
        "data budget": f"{samples:,} samples, {steps}" + (f" (on top of {start}'s own)" if start else ""),
        "meta-steps": meta_steps,
        "tasks per meta-step": m.tasks_per_meta_step,
        "inner loop": f"{m.inner_steps} x {m.inner_optimizer} lr {m.inner_learning_rate}"
                      + (f" betas {tuple(m.inner_betas)}" if m.inner_optimizer == "adam" else "")
                      + f", batch {m.support_batch_size}",
        "outer loop": f"{m.outer_optimizer} lr {m.outer_learning_rate} ({m.lr_scheduler})",
        "frozen (inner / outer)": f"{cfg.freeze.inner} / {cfg.freeze.outer}",
        **{f"last meta-step: {k} (mean over all processes)": f"{v:.4g}" for k, v in sorted(last_logs.items())
           if "loss" in k},
    }
