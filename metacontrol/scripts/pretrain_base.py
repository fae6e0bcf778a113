"""Pre-train the embedded tiny Stable-Diffusion-shaped base model on the synthetic world, on CPU.

    python train/pretrain_base.py --config configs/pretrain_tiny.yaml [key=value ...]
    metacontrol pretrain-base --config configs/pretrain_tiny.yaml [key=value ...]

Stages, each resumable from ``work_dir`` (rerun the same command after an interruption):
  1. render ``num_images`` training scenes;
  2. train the VAE (MSE + tiny KL) on them;
  3. cache the VAE posterior (mean, std) of every image; scaling factor = 1 / std of sampled latents;
  4. train UNet and text encoder jointly on *sampled* latents (epsilon, SD-1.x DDPM schedule), EMA;
  5. export a diffusers ``StableDiffusionPipeline`` folder to ``output_dir`` (default ``outputs/tiny-sd``;
     ``output_dir=checkpoints/tiny-sd`` replaces the shipped base model).

``work_dir/config.yaml`` records the configuration its files were made with; a run whose configuration
differs from it (in anything but ``UNCACHED``) stops instead of resuming from files made for another one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from metacontrol.atomic import atomic_directory, atomic_torch_save, atomic_write, atomic_write_bytes
from metacontrol.config_loader import (
    ConfigError,
    check,
    config_argument_parser,
    config_text,
    load_config,
    save_config,
)
from metacontrol.models.tiny import (
    TinySDConfig,
    build_noise_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    tiny_pipeline,
)
from metacontrol.objective import check_finite
from metacontrol.world import SceneWorld, WorldConfig, vocabulary

logger = logging.getLogger("pretrain_base")


@dataclass(kw_only=True)
class StageConfig:
    max_train_steps: int = 1000
    train_batch_size: int = 16
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 50
    checkpointing_steps: int = 200

    def __post_init__(self) -> None:
        check(self.max_train_steps > 0, "max_train_steps", self.max_train_steps, "a positive integer")
        check(self.train_batch_size > 0, "train_batch_size", self.train_batch_size, "a positive integer")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")


@dataclass
class PretrainConfig:
    output_dir: str = "outputs/tiny-sd"  # not checkpoints/tiny-sd: replacing the shipped model takes asking for it
    work_dir: str = "outputs/pretrain"
    seed: int = 0
    num_images: int = 16000
    num_threads: int = 1
    world: WorldConfig = field(default_factory=WorldConfig)
    model: TinySDConfig = field(default_factory=TinySDConfig)
    vae: StageConfig = field(default_factory=lambda: StageConfig(
        max_train_steps=1200, train_batch_size=16, learning_rate=1e-3, lr_warmup_steps=50, checkpointing_steps=200))
    kl_weight: float = 1e-6
    unet: StageConfig = field(default_factory=lambda: StageConfig(
        max_train_steps=3600, train_batch_size=32, learning_rate=5e-4, lr_warmup_steps=100, checkpointing_steps=250))
    empty_prompt_probability: float = 0.1
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        check(self.num_images >= 64, "num_images", self.num_images, "at least 64")
        check(self.world.resolution == self.model.resolution, "model.resolution", self.model.resolution,
              f"equal to world.resolution ({self.world.resolution})")
        check(0 <= self.empty_prompt_probability < 1, "empty_prompt_probability", self.empty_prompt_probability,
              "a probability in [0, 1)")


# -- the work_dir's record -------------------------------------------------------------------------
UNCACHED = ("output_dir", "work_dir", "num_threads")  # the keys that shape nothing in work_dir


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first field where two configs differ; None if they agree."""
    for f in dataclasses.fields(new):
        key, a, b = prefix + f.name, getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(b):
            if found := first_difference(a, b, key + "."):
                return found
        elif a != b:
            return key, a, b
    return None


def claim_work_dir(cfg: PretrainConfig, work: Path) -> None:
    """Record the configuration that makes ``work``'s files, or check it is the recorded one: cached images,
    latents and stage states made for another configuration must never be resumed as if they were this one's."""
    record = work / "config.yaml"
    if not record.exists():
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record, config_text(cfg).encode())
        return
    try:
        recorded = load_config(PretrainConfig, record)
    except ConfigError as err:
        raise ConfigError(f"work_dir: {work} was made by another version of this script ({err}); "
                          "use another work_dir or delete it") from None
    found = first_difference(dataclasses.replace(recorded, **{k: getattr(cfg, k) for k in UNCACHED}), cfg)
    if found is not None:
        key, old, new = found
        raise ConfigError(f"work_dir: {work} holds files made with {key}={old!r}, this run has {key}={new!r}; "
                          "use another work_dir or delete it")


# -- stage 1: data ---------------------------------------------------------------------------------
def render_dataset(cfg: PretrainConfig, work: Path) -> tuple[torch.Tensor, list[str]]:
    images_path, captions_path = work / "images.npy", work / "captions.json"
    if images_path.exists() and captions_path.exists():
        return torch.from_numpy(np.load(images_path)), json.loads(captions_path.read_text())
    world = SceneWorld(cfg.world)
    images, captions = [], []
    for seed in tqdm(range(cfg.num_images), desc="render scenes"):
        scene = world.sample(seed)
        images.append(scene.image)
        captions.append(scene.caption)
    array = np.stack(images).transpose(0, 3, 1, 2).copy()  # N, 3, H, W uint8
    atomic_write(images_path, lambda file: np.save(file, array))
    atomic_write_bytes(captions_path, json.dumps(captions).encode())
    return torch.from_numpy(array), captions


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


# -- resumable training loop shared by the VAE and UNet stages -------------------------------------
class ResumableStage:
    """Holds a stage's modules, optimiser, schedule and step; saves and restores them atomically."""

    def __init__(self, name: str, work: Path, modules: dict[str, torch.nn.Module], stage: StageConfig,
                 ema: EMAModel | None = None) -> None:
        self.name, self.path, self.modules, self.stage, self.ema = name, work / f"{name}_state.pt", modules, stage, ema
        params = [p for m in modules.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=1e-2)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, stage.lr_warmup_steps, stage.max_train_steps)
        self.step = 0
        if self.path.exists():
            state = torch.load(self.path, weights_only=False)
            for key, module in modules.items():
                module.load_state_dict(state["modules"][key])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            self.step = state["step"]
            logger.info("%s: resumed at step %d from %s", name, self.step, self.path)

    @property
    def done(self) -> bool:
        return self.step >= self.stage.max_train_steps

    def save(self) -> None:
        atomic_torch_save({
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(), "step": self.step,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }, self.path)  # fmt: skip

    def run(self, loss_fn) -> None:
        """Call ``loss_fn(step)`` until max_train_steps, stepping, logging and checkpointing."""
        bar = tqdm(total=self.stage.max_train_steps, initial=self.step, desc=f"train {self.name}")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        while not self.done:
            loss = loss_fn(self.step)
            check_finite(loss, f"{self.name} step {self.step} (last good state: {self.path})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.step(params)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.step % self.stage.checkpointing_steps == 0 or self.done:
                self.save()
        bar.close()


# -- stage 2: VAE ----------------------------------------------------------------------------------
def train_vae(cfg: PretrainConfig, work: Path, images: torch.Tensor):
    vae = build_vae(cfg.model)
    stage = ResumableStage("vae", work, {"vae": vae}, cfg.vae)
    n_train = images.shape[0]

    def loss_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, n_train, (cfg.vae.train_batch_size,), generator=g)
        x = to_model_range(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        return F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()

    stage.run(loss_fn)
    return vae.eval().requires_grad_(False)


# -- stage 3: latent cache -------------------------------------------------------------------------
@torch.no_grad()
def cache_latents(vae, images: torch.Tensor, work: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    path = work / "latents.pt"
    if path.exists():
        state = torch.load(path)
        return state["mean"], state["std"], state["scaling_factor"]
    means, stds = [], []
    for start in tqdm(range(0, images.shape[0], 256), desc="encode latents"):
        dist = vae.encode(to_model_range(images[start : start + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    scaling_factor = float(1.0 / sampled.std())
    logger.info("latents: spread %.3f, mean posterior std %.4f, scaling factor %.4f",
                float(sampled.std()), float(std.mean()), scaling_factor)
    atomic_torch_save({"mean": mean, "std": std, "scaling_factor": scaling_factor}, path)
    return mean, std, scaling_factor


# -- stage 4: UNet + text encoder ------------------------------------------------------------------
def train_unet(cfg: PretrainConfig, work: Path, captions: list[str], mean: torch.Tensor, std: torch.Tensor,
               scaling_factor: float):
    tokenizer = build_tokenizer(vocabulary(), cfg.model.max_tokens)
    text_encoder, unet = build_text_encoder(cfg.model, tokenizer), build_unet(cfg.model)
    scheduler = build_noise_scheduler()
    trained = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = EMAModel(trained.parameters(), decay=cfg.ema_decay)
    stage = ResumableStage("unet", work, {"unet": unet, "text_encoder": text_encoder}, cfg.unet, ema=ema)
    token_ids = tokenizer(captions + [""], padding="max_length", max_length=cfg.model.max_tokens,
                          truncation=True, return_tensors="pt").input_ids
    empty_ids = token_ids[-1]

    def loss_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 + step)
        bsz = cfg.unet.train_batch_size
        idx = torch.randint(0, mean.shape[0], (bsz,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling_factor
        ids = token_ids[idx].clone()
        ids[torch.rand(bsz, generator=g) < cfg.empty_prompt_probability] = empty_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        return F.mse_loss(pred, noise)

    stage.run(loss_fn)
    ema.copy_to(trained.parameters())
    return unet.eval(), text_encoder.eval(), tokenizer


# -- stage 5: export -------------------------------------------------------------------------------
def export_pipeline(cfg: PretrainConfig, vae, unet, text_encoder, tokenizer, scaling_factor: float) -> Path:
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = tiny_pipeline(cfg.model, vocabulary(), vae, unet, text_encoder, tokenizer)
    out = Path(cfg.output_dir)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_config(cfg, tmp / "pretrain_config.yaml")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__, "configs/pretrain_tiny.yaml", "unet.max_train_steps=100")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work_dir)
    claim_work_dir(cfg, work)
    start = time.time()
    images, captions = render_dataset(cfg, work)
    vae = train_vae(cfg, work, images)
    mean, std, scaling_factor = cache_latents(vae, images, work)
    unet, text_encoder, tokenizer = train_unet(cfg, work, captions, mean, std, scaling_factor)
    out = export_pipeline(cfg, vae, unet, text_encoder, tokenizer, scaling_factor)
    minutes = (time.time() - start) / 60
    logger.info("done in %.1f min (this invocation); pipeline written to %s", minutes, out)
    print(f"pretrain_base: wrote {out} in {math.ceil(minutes)} min")

