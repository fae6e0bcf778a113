"""Precomputed VAE posteriors and text embeddings for training data (``cache: latents``).

The VAE and text encoder are frozen, so their outputs for a given image or caption are the same in
every task, inner step and epoch: compute them once. The posterior is kept as (mean, std), so the
latents used in training are still *sampled* exactly as without the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from metacontrol.data.pools import TaskData
from metacontrol.models.base import BaseModel


@torch.no_grad()
def encode_samples(data: TaskData, base: BaseModel, batch_size: int = 64, show_progress: bool = True,
                   desc: str = "encode") -> dict[str, torch.Tensor]:
    """VAE posterior mean/std and text embeddings of every sample of ``data`` (fp32, on the CPU)."""
    device, dtype = base.vae.device, base.vae.dtype
    out: dict[str, list[torch.Tensor]] = {"latent_mean": [], "latent_std": [], "text_embeds": []}
    for start in tqdm(range(0, len(data), batch_size), desc=desc, disable=not show_progress):
        batch = data.item_tensors(range(start, min(start + batch_size, len(data))))
        dist = base.vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
        out["latent_mean"].append(dist.mean.float().cpu())
        out["latent_std"].append(dist.std.float().cpu())
        out["text_embeds"].append(base.encode_prompts(list(batch["caption"])).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def attach_encodings(data: dict[str, TaskData], base: BaseModel, cache_dir: str | None = None,
                     show_progress: bool = True) -> None:
    """Encode each task's samples once; tasks that share their images (synthetic pools) share the work."""
    done: dict[int, dict[str, torch.Tensor]] = {}
    for task, task_data in data.items():
        key = _shared_images_key(task_data)
        if key is None or key not in done:
            encoded = encode_samples(task_data, base, show_progress=show_progress, desc=f"encode {task}")
            if key is not None:
                done[key] = encoded
        task_data.cached = done[key] if key is not None else encoded


def _shared_images_key(task_data: TaskData) -> int | None:
    images: Sequence | None = getattr(task_data, "images", None)
    return id(images) if images is not None else None
