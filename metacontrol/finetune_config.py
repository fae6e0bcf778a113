"""Configuration of few-shot adaptation (``train/finetune.py``): one new condition, ``shots`` examples.

Key names follow diffusers' ``train_controlnet.py`` where one exists; the data keys are those of
``DataConfig`` for a single task (``condition``) of ``shots`` examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from metacontrol.conditions import condition_names
from metacontrol.config import DataConfig, FreezeSpec
from metacontrol.configuration import check
from metacontrol.data.world import WorldConfig
from metacontrol.lora import LORA_FULLY_TRAINED, LORA_TARGET_MODULES
from metacontrol.meta.freezing import PRESETS


@dataclass
class FinetuneConfig:
    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    revision: str | None = None
    # A meta-learned initialisation or any diffusers ControlNet folder; null: the standard from_unet init.
    controlnet_model_name_or_path: str | None = None
    output_dir: str | None = None  # null: outputs/finetune-{condition}-{mode}, so runs of another kind never overwrite
    seed: int = 0
    resolution: int = 64
    # -- the new condition and its few examples: the first `shots` of the source -----------------------
    condition: str = "normal"
    shots: int = 16
    shot_offset: int = 0  # index of the first example used: seeds of a benchmark draw disjoint shots
    source: Literal["synthetic", "imagefolder"] = "synthetic"
    world: WorldConfig = field(default_factory=WorldConfig)
    train_data_dir: str | None = None  # imagefolder: `{train_data_dir}/{condition}` if it exists, else itself
    annotators: str | None = None
    on_bad_sample: Literal["error", "skip"] = "error"
    caption_column: str = "text"  # imagefolder: the caption's key in metadata.jsonl
    # -- optimisation --------------------------------------------------------------------------------------
    max_train_steps: int = 100
    train_batch_size: int = 8  # per process, drawn without replacement from the shots every step
    learning_rate: float = 5e-4
    adam_beta1: float = 0.9  # 0 is Reptile's choice (no momentum), for adapting a Reptile start as it was trained
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mode: Literal["full", "lora"] = "full"
    freeze: FreezeSpec = "none"  # full mode: a preset (none | paper | zero_convs_only) or glob patterns
    lora_rank: int = 8
    lora_alpha: float | None = None  # null: lora_rank (scale 1)
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    lora_modules_to_save: list[str] = field(default_factory=lambda: list(LORA_FULLY_TRAINED))
    # A saved adapter to start from (the `lora/` folder of a meta-learned LoRA start) instead of a fresh LoRA;
    # controlnet_model_name_or_path must then be the ControlNet it was trained on (its model card names it).
    lora_init: str | None = None
    # -- machinery -------------------------------------------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: whatever accelerate launch says
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    cache: Literal["latents", "none"] = "latents"
    cache_dir: str | None = None  # encodings cache; None: .cache/metacontrol (synthetic) or next to the data
    checkpointing_steps: int = 50
    checkpoints_total_limit: int | None = 1
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    save_steps: list[int] = field(default_factory=list)  # also save the ControlNet to output_dir/step-{N}
    validation_steps: int = 0
    num_validation_images: int = 2
    validation_inference_steps: int = 20
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_dir: str = "logs"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        check(self.condition in condition_names(), "condition", self.condition,
              f"one of {', '.join(condition_names())}")
        if self.output_dir is None:
            self.output_dir = f"outputs/finetune-{self.condition}-{self.mode}"
        check(self.resolution >= 8, "resolution", self.resolution, "an integer >= 8")
        check(self.shots >= 1, "shots", self.shots, "a positive integer")
        check(self.shot_offset >= 0, "shot_offset", self.shot_offset, "an integer >= 0")
        check(1 <= self.train_batch_size <= self.shots, "train_batch_size", self.train_batch_size,
              f"from 1 to shots ({self.shots}): a batch holds distinct examples")
        check(self.max_train_steps >= 0, "max_train_steps", self.max_train_steps, ">= 0")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        for key in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "a number in [0, 1)")
        check(self.adam_weight_decay >= 0, "adam_weight_decay", self.adam_weight_decay, ">= 0")
        check(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, ">= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 disables clipping)")
        check(not isinstance(self.freeze, str) or self.freeze in PRESETS, "freeze", self.freeze,
              f"one of {', '.join(PRESETS)} or a list of glob patterns")
        check(self.mode == "full" or self.freeze == "none", "freeze", self.freeze,
              "'none' in lora mode (LoRA picks its layers by lora_target_modules and lora_modules_to_save)")
        check(self.lora_init is None or self.mode == "lora", "lora_init", self.lora_init,
              "null unless mode is 'lora'")
        check(self.lora_rank >= 1, "lora_rank", self.lora_rank, "a positive integer")
        check(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "null or > 0")
        check(self.checkpointing_steps >= 1, "checkpointing_steps", self.checkpointing_steps,
              "a positive integer")
        check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
              "checkpoints_total_limit", self.checkpoints_total_limit, "null or a positive integer")
        check(all(1 <= s <= self.max_train_steps for s in self.save_steps) and len(set(self.save_steps))
              == len(self.save_steps), "save_steps", self.save_steps,
              f"distinct step numbers from 1 to max_train_steps ({self.max_train_steps})")
        check(self.validation_steps >= 0, "validation_steps", self.validation_steps, ">= 0 (0 disables)")
        if self.source == "synthetic":
            check(self.world.resolution == self.resolution, "world.resolution", self.world.resolution,
                  f"equal to resolution ({self.resolution})")
        else:
            check(self.train_data_dir is not None, "train_data_dir", self.train_data_dir,
                  f"a path when source is {self.source!r}")

    @property
    def data(self) -> DataConfig:
        """The one-task data section, as the shared helpers of meta-training (validation grids) read it."""
        return DataConfig(source=self.source, tasks=[self.condition], world=self.world,
                          pool_size=max(self.shots, 8),  # unused there; DataConfig asks for >= 8
                          train_data_dir=self.train_data_dir, annotators=self.annotators,
                          on_bad_sample=self.on_bad_sample, caption_column=self.caption_column)
