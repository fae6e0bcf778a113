"""Configuration of meta-training (``meta_train.py``), as typed dataclasses loaded from YAML.

Key names follow diffusers' training scripts where one exists (``pretrained_model_name_or_path``,
``output_dir``, ``mixed_precision``, ``checkpointing_steps``, ``checkpoints_total_limit``,
``resume_from_checkpoint``, ``validation_steps``, ``report_to``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from metacontrol.configuration import check
from metacontrol.data.world import WorldConfig
from metacontrol.meta.freezing import PRESETS

FreezeSpec = str | list[str]


@dataclass
class DataConfig:
    """Where task data comes from: the synthetic world, an image folder, or a saved HF dataset."""

    source: Literal["synthetic", "imagefolder", "hf"] = "synthetic"
    tasks: list[str] = field(default_factory=lambda: ["canny", "hed", "depth", "pose"])
    world: WorldConfig = field(default_factory=WorldConfig)
    pool_size: int = 512  # synthetic scenes per task pool, rendered once at start-up
    # imagefolder: one folder per task, ``{train_data_dir}/{task}`` or a shared folder annotated per task.
    train_data_dir: str | None = None
    annotators: str | None = None  # local folder (copy of lllyasviel/Annotators) or Hub id
    on_bad_sample: Literal["error", "skip"] = "error"
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"

    def __post_init__(self) -> None:
        check(len(self.tasks) >= 1, "tasks", self.tasks, "at least one condition name")
        check(len(set(self.tasks)) == len(self.tasks), "tasks", self.tasks, "no repeated task")
        check(self.pool_size >= 8, "pool_size", self.pool_size, "at least 8")
        check(self.source == "synthetic" or self.train_data_dir is not None, "train_data_dir",
              self.train_data_dir, f"a path when data.source is {self.source!r}")


@dataclass
class MetaConfig:
    """The outer and inner loops. ``joint`` is the multi-task baseline on the same data budget."""

    algorithm: Literal["reptile", "fomaml", "joint"] = "reptile"
    max_meta_steps: int = 300
    tasks_per_meta_step: int = 2
    inner_steps: int = 4
    inner_optimizer: Literal["sgd", "adam"] = "adam"
    inner_learning_rate: float = 5e-4
    inner_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # inner Adam; Reptile's authors: beta1 0
    support_batch_size: int = 8
    query_batch_size: int = 8
    outer_optimizer: Literal["sgd", "adamw"] = "sgd"
    outer_learning_rate: float = 1.0
    outer_weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # > 0: meta-learn a LoRA start instead: the ControlNet (controlnet_model_name_or_path, e.g. a joint one) stays
    # as it is and only LoRA adapters of this rank plus the zero convolutions train, in both loops.
    lora_rank: int = 0
    lora_alpha: float | None = None  # null: lora_rank

    def __post_init__(self) -> None:
        for key in ("max_meta_steps", "tasks_per_meta_step", "inner_steps", "support_batch_size", "query_batch_size"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "a positive integer")
        check(self.inner_learning_rate > 0, "inner_learning_rate", self.inner_learning_rate, "> 0")
        check(len(self.inner_betas) == 2 and all(0 <= b < 1 for b in self.inner_betas), "inner_betas",
              self.inner_betas, "two numbers in [0, 1): Adam's beta1 and beta2")
        check(self.outer_learning_rate > 0, "outer_learning_rate", self.outer_learning_rate, "> 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        check(self.lora_rank >= 0, "lora_rank", self.lora_rank, ">= 0 (0: the whole ControlNet trains)")

    def data_budget(self) -> tuple[int, str]:
        """Samples seen and optimiser steps of a whole run, so recipes can be compared at equal budgets."""
        tasks, steps, inner = self.tasks_per_meta_step, self.max_meta_steps, self.inner_steps
        if self.algorithm == "joint":
            return steps * inner * tasks * self.support_batch_size, f"{steps * inner:,} optimiser steps"
        query = self.query_batch_size if self.algorithm == "fomaml" else 0
        samples = steps * tasks * (inner * self.support_batch_size + query)
        return samples, f"{steps * tasks * inner:,} inner + {steps:,} outer optimiser steps"


@dataclass
class FreezeConfig:
    """Frozen ControlNet blocks per phase: a preset (none | paper | zero_convs_only) or glob patterns."""

    inner: FreezeSpec = "none"
    outer: FreezeSpec = "none"

    def __post_init__(self) -> None:
        for phase in ("inner", "outer"):
            spec = getattr(self, phase)
            check(not isinstance(spec, str) or spec in PRESETS, phase, spec,
                  f"one of {', '.join(PRESETS)} or a list of glob patterns")


@dataclass
class MetaTrainConfig:
    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    revision: str | None = None
    controlnet_model_name_or_path: str | None = None  # start from this ControlNet instead of from_unet
    output_dir: str = "outputs/meta-controlnet-tiny"
    seed: int = 0
    resolution: int = 64
    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: whatever accelerate launch says
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    cache: Literal["latents", "none"] = "latents"
    cache_dir: str | None = None  # encodings cache; None: .cache/metacontrol (synthetic) or next to the data
    checkpointing_steps: int = 50
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 50
    num_validation_images: int = 2
    validation_inference_steps: int = 20
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_dir: str = "logs"
    num_threads: int | None = None  # torch CPU threads per process (None: torch's default)

    def __post_init__(self) -> None:
        check(self.resolution >= 8, "resolution", self.resolution, "an integer >= 8")
        check(self.checkpointing_steps >= 1, "checkpointing_steps", self.checkpointing_steps, "a positive integer")
        check(self.validation_steps >= 0, "validation_steps", self.validation_steps, ">= 0 (0 disables)")
        check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit",
              self.checkpoints_total_limit, "null or a positive integer")
        check(self.meta.lora_rank == 0 or self.freeze.inner == self.freeze.outer == "none", "freeze",
              f"{self.freeze.inner} / {self.freeze.outer}",
              "'none' for both phases when meta.lora_rank > 0 (the adapters and zero convolutions are what trains)")
        if self.data.source == "synthetic":
            check(self.data.world.resolution == self.resolution, "data.world.resolution",
                  self.data.world.resolution, f"equal to resolution ({self.resolution})")
