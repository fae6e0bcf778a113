"""Configuration of the training runs, as typed dataclasses loaded from YAML (``config_loader.py``).

``RunConfig`` holds what every run has (models, output, machinery); ``MetaTrainConfig``
(``meta_train.py``) and ``FinetuneConfig`` (``train/finetune.py``) extend it, so a fix to a shared
key or check is made once. ``SourceConfig`` says where examples come from, for meta-training's
``data:`` section and fine-tuning's top level alike. Key names follow diffusers' training scripts
where one exists (``pretrained_model_name_or_path``, ``output_dir``, ``mixed_precision``,
``checkpointing_steps``, ``checkpoints_total_limit``, ``resume_from_checkpoint``, ``validation_steps``,
``report_to``...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from metacontrol.conditions import condition_names
from metacontrol.config_loader import check, config_argument_parser, load_config
from metacontrol.layer_sets import PRESETS
from metacontrol.world import SceneOptions, WorldConfig

FreezeSpec = str | list[str]
SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine"]


def check_schedule(lr_scheduler: str, lr_warmup_steps: int, max_grad_norm: float) -> None:
    """The optimiser keys meta-training's outer loop and fine-tuning share, checked in one place."""
    check(lr_warmup_steps >= 0, "lr_warmup_steps", lr_warmup_steps, ">= 0")
    check(lr_warmup_steps == 0 or lr_scheduler != "constant", "lr_warmup_steps", lr_warmup_steps,
          "0 with lr_scheduler 'constant', which has no warmup (diffusers' get_scheduler drops it); "
          "use lr_scheduler: constant_with_warmup")
    check(max_grad_norm >= 0, "max_grad_norm", max_grad_norm, ">= 0 (0 disables clipping)")


def check_freeze_spec(key: str, spec: FreezeSpec) -> None:
    check(not isinstance(spec, str) or spec in PRESETS, key, spec,
          f"one of {', '.join(PRESETS)} or a list of glob patterns")


@dataclass
class RunConfig:
    """The keys every training run shares: base and starting models, output, precision, checkpoints, logs."""

    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    revision: str | None = None
    # A ControlNet folder or Hub id to start from; null: the standard ``ControlNetModel.from_unet`` initialisation.
    controlnet_model_name_or_path: str | None = None
    output_dir: str | None = None
    seed: int = 0
    resolution: int = 64
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: whatever accelerate launch says
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    cache: Literal["latents", "none"] = "latents"
    # encodings (and an image folder's annotated maps, in annotations/); None: .cache/metacontrol (synthetic)
    # or next to the data
    cache_dir: str | None = None
    # once prompts are encoded (the cache, the validation captions) the text encoders are let go: their memory is
    # free for training (T5-XXL alone is 9.5 GB in bf16). Needs cache: latents
    free_text_encoders: bool = False
    # bitsandbytes' 8-bit Adam / AdamW for every optimiser that keeps moments (the inner Adam, an AdamW outer or
    # joint step, fine-tuning): 2 bytes of state per parameter instead of 8 (pip install 'metacontrol[bnb]')
    use_8bit_adam: bool = False
    checkpointing_steps: int = 50
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 50
    num_validation_images: int = 2
    validation_inference_steps: int = 20
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_dir: str = "logs"
    num_threads: int | None = None  # torch CPU threads per process (None: torch's default)
    # processes that read the next steps' batches while the model trains (0: read in the loop, no read-ahead)
    dataloader_num_workers: int = 0
    dataloader_prefetch_factor: int = 2  # steps read ahead per worker

    def __post_init__(self) -> None:
        check(self.resolution >= 8, "resolution", self.resolution, "an integer >= 8")
        check(not self.free_text_encoders or self.cache == "latents", "free_text_encoders", self.free_text_encoders,
              "false unless cache is 'latents' (the cached prompt encodings stand in for the text encoders)")
        check(self.checkpointing_steps >= 1, "checkpointing_steps", self.checkpointing_steps, "a positive integer")
        check(self.validation_steps >= 0, "validation_steps", self.validation_steps, ">= 0 (0 disables)")
        for key in ("num_validation_images", "validation_inference_steps"):
            check(getattr(self, key) >= 1, key, getattr(self, key),
                  "a positive integer (validation_steps: 0 turns validation off)")
        check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit",
              self.checkpoints_total_limit, "null or a positive integer")
        check(self.dataloader_num_workers >= 0, "dataloader_num_workers", self.dataloader_num_workers,
              ">= 0 (0 reads batches in the training loop)")
        check(self.dataloader_prefetch_factor >= 1, "dataloader_prefetch_factor", self.dataloader_prefetch_factor,
              "a positive integer")


@dataclass
class SourceConfig:
    """Where examples come from: the synthetic world, an image folder, a saved HF dataset, or the output of
    ``metacontrol prepare`` (``data/sources.py``)."""

    source: Literal["synthetic", "imagefolder", "hf", "prepared"] = "synthetic"
    world: SceneOptions = field(default_factory=SceneOptions)  # rendered at the run's resolution
    # imagefolder / hf: ``{train_data_dir}/{task}`` if that folder exists, else ``train_data_dir`` itself;
    # prepared: the output_dir of `metacontrol prepare` (its encodings serve `cache: latents` when the base matches)
    train_data_dir: str | None = None
    annotators: str | None = None  # local folder (copy of lllyasviel/Annotators) or Hub id
    on_bad_sample: Literal["error", "skip"] = "error"
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"

    def __post_init__(self) -> None:
        check(self.source == "synthetic" or self.train_data_dir is not None, "train_data_dir",
              self.train_data_dir, f"a path when source is {self.source!r}")

    def world_at(self, resolution: int) -> WorldConfig:
        """The synthetic world rendering at the run's ``resolution``."""
        return WorldConfig(**asdict(self.world), resolution=resolution)


@dataclass
class DataConfig(SourceConfig):
    """Meta-training's tasks and where their examples come from."""

    # condition names, generated tasks (gen-<kind>-<seed>) or families of them (gen:<kind>+<kind>:<count>:<seed>,
    # expanded here into their names: metacontrol/conditions/generated.py)
    tasks: list[str] = field(default_factory=lambda: ["canny", "hed", "depth", "pose"])
    pool_size: int = 512  # synthetic scenes per task pool, rendered once at start-up
    # the conditions kept for evaluation: no generated task may be made from what they show
    held_out: list[str] = field(default_factory=lambda: ["seg", "normal", "scribble", "lineart"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(task.startswith("gen") for task in self.tasks):
            from metacontrol.conditions.generated import check_held_out, expand_tasks

            self.tasks = expand_tasks(self.tasks)
            check_held_out(self.tasks, self.held_out)
        check(len(self.tasks) >= 1, "tasks", self.tasks, "at least one condition name")
        check(len(set(self.tasks)) == len(self.tasks), "tasks", self.tasks, "no repeated task")
        check(self.pool_size >= 8, "pool_size", self.pool_size, "at least 8")


@dataclass
class MetaConfig:
    """The outer and inner loops. ``joint`` is the multi-task baseline on the same data budget; ``lora_ml`` is
    joint training with one LoRA of rank ``lora_rank`` per task beside the shared ControlNet (LoRA-ML)."""

    algorithm: Literal["reptile", "fomaml", "joint", "lora_ml"] = "reptile"
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
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # clips every step on a batch: the inner steps, and joint's steps
    # clips the meta-gradient of Reptile / FOMAML before the outer step (0: off). Off by default: for Reptile
    # with SGD a clipped theta - phi would change the meta step size epsilon from step to step.
    outer_max_grad_norm: float = 0.0
    # > 0 with reptile / fomaml: meta-learn a LoRA start instead: the ControlNet (controlnet_model_name_or_path, e.g.
    # a joint one) stays as it is and only LoRA adapters of this rank plus the zero convolutions train, in both loops.
    # With lora_ml: the rank of each task's own adapter (the shared ControlNet trains whole).
    lora_rank: int = 0
    lora_alpha: float | None = None  # null: lora_rank
    lora_learning_rate: float | None = None  # lora_ml: the task adapters' rate (null: outer_learning_rate)

    def __post_init__(self) -> None:
        for key in ("max_meta_steps", "tasks_per_meta_step", "inner_steps", "support_batch_size", "query_batch_size"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "a positive integer")
        check(self.inner_learning_rate > 0, "inner_learning_rate", self.inner_learning_rate, "> 0")
        check(len(self.inner_betas) == 2 and all(0 <= b < 1 for b in self.inner_betas), "inner_betas",
              self.inner_betas, "two numbers in [0, 1): Adam's beta1 and beta2")
        check(self.outer_learning_rate > 0, "outer_learning_rate", self.outer_learning_rate, "> 0")
        check(self.outer_weight_decay >= 0, "outer_weight_decay", self.outer_weight_decay, ">= 0")
        check_schedule(self.lr_scheduler, self.lr_warmup_steps, self.max_grad_norm)
        check(self.outer_max_grad_norm >= 0, "outer_max_grad_norm", self.outer_max_grad_norm,
              ">= 0 (0 disables clipping)")
        check(self.lora_rank >= 0, "lora_rank", self.lora_rank, ">= 0 (0: the whole ControlNet trains)")
        check(self.lora_learning_rate is None or self.lora_learning_rate > 0, "lora_learning_rate",
              self.lora_learning_rate, "null or > 0")
        check(self.algorithm != "lora_ml" or self.lora_rank >= 1, "lora_rank", self.lora_rank,
              "a positive integer with algorithm lora_ml (the rank of each task's adapter)")

    def data_budget(self) -> tuple[int, str]:
        """Samples seen and optimiser steps of a whole run, so recipes can be compared at equal budgets."""
        tasks, steps, inner = self.tasks_per_meta_step, self.max_meta_steps, self.inner_steps
        if self.algorithm in ("joint", "lora_ml"):
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
            check_freeze_spec(phase, getattr(self, phase))


@dataclass
class MetaTrainConfig(RunConfig):
    """``meta_train.py``: a shared initialisation learned over ``data.tasks``."""

    output_dir: str = "outputs/meta-controlnet-tiny"
    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.meta.lora_rank == 0 or self.meta.algorithm == "lora_ml"
              or self.freeze.inner == self.freeze.outer == "none", "freeze",
              f"{self.freeze.inner} / {self.freeze.outer}",
              "'none' for both phases when meta.lora_rank > 0 (the adapters and zero convolutions are what trains)")


@dataclass
class FinetuneConfig(SourceConfig, RunConfig):
    """``train/finetune.py``: one new condition from ``shots`` examples (the first ones of the source from
    ``shot_offset`` on), full or LoRA. The source keys sit at the top level here."""

    # null: outputs/finetune-{condition}-{mode}, so runs of another kind never overwrite
    output_dir: str | None = None
    condition: str = "normal"
    shots: int = 16
    shot_offset: int = 0  # index of the first example used: seeds of a benchmark draw disjoint shots
    # -- optimisation --------------------------------------------------------------------------------------
    max_train_steps: int = 100
    train_batch_size: int = 8  # per process, drawn without replacement from the shots every step
    learning_rate: float = 5e-4
    adam_beta1: float = 0.9  # 0 is Reptile's choice (no momentum), for adapting a Reptile start as it was trained
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mode: Literal["full", "lora"] = "full"
    freeze: FreezeSpec = "none"  # full mode: a preset (none | paper | zero_convs_only | later_blocks) or glob patterns
    lora_rank: int = 8
    lora_alpha: float | None = None  # null: lora_rank (scale 1)
    # null: the family's (layer_sets.LORA_TARGET_MODULES / LORA_FULLY_TRAINED for UNet ControlNets; attention
    # projections and the zero layers for SD3 / Flux: metacontrol/families/base.py)
    lora_target_modules: list[str] | None = None
    lora_modules_to_save: list[str] | None = None
    # A saved adapter to start from (the `lora/` folder of a meta-learned LoRA start) instead of a fresh LoRA;
    # controlnet_model_name_or_path must then be the ControlNet it was trained on (its model card names it).
    lora_init: str | None = None
    # -- run machinery that differs from meta-training's defaults -------------------------------------------
    checkpoints_total_limit: int | None = 1
    save_steps: list[int] = field(default_factory=list)  # also save the ControlNet to output_dir/step-{N}
    validation_steps: int = 0

    def __post_init__(self) -> None:
        if self.condition.startswith("gen-"):  # a generated task (synthetic scenes): one line if the name is not one
            from metacontrol.conditions.generated import make

            make(self.condition)
        else:
            check(self.condition in condition_names(), "condition", self.condition,
                  f"one of {', '.join(condition_names())}, or a generated task gen-<kind>-<seed>")
        if self.output_dir is None:
            self.output_dir = f"outputs/finetune-{self.condition}-{self.mode}"
        RunConfig.__post_init__(self)
        SourceConfig.__post_init__(self)
        check(self.shots >= 1, "shots", self.shots, "a positive integer")
        check(self.shot_offset >= 0, "shot_offset", self.shot_offset, "an integer >= 0")
        check(1 <= self.train_batch_size <= self.shots, "train_batch_size", self.train_batch_size,
              f"from 1 to shots ({self.shots}): a batch holds distinct examples")
        check(self.max_train_steps >= 0, "max_train_steps", self.max_train_steps, ">= 0")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        for key in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "a number in [0, 1)")
        check(self.adam_weight_decay >= 0, "adam_weight_decay", self.adam_weight_decay, ">= 0")
        check_schedule(self.lr_scheduler, self.lr_warmup_steps, self.max_grad_norm)
        check_freeze_spec("freeze", self.freeze)
        check(self.mode == "full" or self.freeze == "none", "freeze", self.freeze,
              "'none' in lora mode (LoRA picks its layers by lora_target_modules and lora_modules_to_save)")
        check(self.lora_init is None or self.mode == "lora", "lora_init", self.lora_init,
              "null unless mode is 'lora'")
        check(self.lora_rank >= 1, "lora_rank", self.lora_rank, "a positive integer")
        check(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "null or > 0")
        check(all(1 <= s <= self.max_train_steps for s in self.save_steps) and len(set(self.save_steps))
              == len(self.save_steps), "save_steps", self.save_steps,
              f"distinct step numbers from 1 to max_train_steps ({self.max_train_steps})")


@dataclass
class PrepareConfig:
    """``metacontrol prepare``: a source's examples resized, annotated per condition and optionally encoded, as
    resumable shards on disk (``metacontrol/data/prepare.py``), for training with ``source: prepared``."""

    # imagefolder: a folder with metadata.jsonl; hf: a dataset saved with save_to_disk; stream: a dataset id or
    # folder that datasets.load_dataset(..., streaming=True) reads row by row (nothing is downloaded up front)
    source: Literal["imagefolder", "hf", "stream"] = "imagefolder"
    train_data_dir: str | None = None
    split: str = "train"  # of a saved DatasetDict or a streamed dataset
    conditions: list[str] = field(default_factory=lambda: ["canny"])
    annotators: str | None = None  # local folder (copy of lllyasviel/Annotators) or Hub id
    on_bad_sample: Literal["error", "skip"] = "error"
    image_column: str = "image"
    # null: annotate every condition; a column (hf, stream) or a metadata conditioning_file_name (imagefolder)
    # holds one condition's ready maps, so then `conditions` must name exactly that one
    conditioning_image_column: str | None = None
    caption_column: str = "text"
    resolution: int = 512
    output_dir: str = "outputs/prepared"
    shard_size: int = 256  # samples per shard: the unit of resuming and of splitting across processes
    max_samples: int | None = None  # the first N rows only (null: all)
    dataloader_num_workers: int = 2  # processes decoding images beside the annotators
    encode: bool = False  # also the VAE latents and text embeddings of this base model (for `cache: latents`)
    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    revision: str | None = None
    encode_batch_size: int = 8

    def __post_init__(self) -> None:
        check(self.train_data_dir is not None, "train_data_dir", self.train_data_dir,
              f"the path (or, for source stream, dataset id) of the {self.source} data")
        check(len(self.conditions) >= 1 and len(set(self.conditions)) == len(self.conditions), "conditions",
              self.conditions, "one or more distinct condition names")
        for name in self.conditions:
            check(name in condition_names(), "conditions", name, f"one of {', '.join(condition_names())}")
        check(self.conditioning_image_column is None or len(self.conditions) == 1, "conditioning_image_column",
              self.conditioning_image_column, "null when several conditions are prepared (its maps are one condition's)")
        check(self.resolution >= 8, "resolution", self.resolution, "an integer >= 8")
        check(self.shard_size >= 1, "shard_size", self.shard_size, "a positive integer")
        check(self.max_samples is None or self.max_samples >= 1, "max_samples", self.max_samples, "null or >= 1")
        check(self.dataloader_num_workers >= 0, "dataloader_num_workers", self.dataloader_num_workers, ">= 0")
        check(self.encode_batch_size >= 1, "encode_batch_size", self.encode_batch_size, "a positive integer")


# The training scripts whose configuration is checked before they import anything heavy (``cli.run_script``),
# and the file each reads when no ``--config`` is given.
SCRIPT_CONFIGS: dict[str, tuple[type, str | None]] = {
    "meta_train": (MetaTrainConfig, "configs/meta_tiny.yaml"),
    "finetune": (FinetuneConfig, "configs/finetune_tiny.yaml"),
    "prepare": (PrepareConfig, None),
}


def check_script_config(script: str, argv: list[str]) -> None:
    """Load and validate ``script``'s configuration from its command line, raising its ``ConfigError``."""
    config_class, default = SCRIPT_CONFIGS[script]
    args = config_argument_parser(None, default, "").parse_intermixed_args(argv)
    load_config(config_class, args.config, args.overrides)
