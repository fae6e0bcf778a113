"""Task data for training loops: ``data[task].batch(indices)`` gives one collated batch.

The synthetic world is rendered once into an in-memory pool per split (each scene once, every task's
condition from it); image folders and HF datasets are read lazily, item by item, through their
``Dataset`` (annotations are cached on disk there). Both can carry precomputed latents and text
embeddings (see ``metacontrol.data.encoding_cache``), which the training objective then uses instead of the VAE
and text encoder.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from metacontrol.conditions import get_condition, task_list
from metacontrol.data.datasets import SPLIT_SEED_OFFSETS
from metacontrol.world import Scene, SceneWorld, WorldConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from metacontrol.families import ModelFamily

logger = logging.getLogger(__name__)
LATENT_KEYS = ("latent_mean", "latent_std")  # the VAE posterior of a sample's image
UNKNOWN_EXAMPLES = 5  # unknown words named in the warning


def cached_keys(family: ModelFamily) -> tuple[str, ...]:
    """The tensors an encoded sample has: its VAE posterior and its family's prompt encodings."""
    return (*LATENT_KEYS, *family.text_keys)


class TaskData:
    """A task's samples. Subclasses provide ``__len__``, ``item_tensors`` and ``captions`` (a sequence of
    every sample's caption); caches attach tensors."""

    captions: Sequence[str]

    def __init__(self) -> None:
        self.cached: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def item_tensors(self, indices: Sequence[int], pixels: bool = True) -> dict:
        """The collated samples; ``pixels=False`` when cached encodings stand in for the images, which are then
        left out (and, where the source can, never decoded)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A content hash of what the frozen VAE and text encoder see: the images and captions, in order.

        Condition maps are left out on purpose: they do not change the encodings, so tasks that share
        their images (the synthetic pools, one image folder annotated per task) share one cache entry.
        """
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> dict:
        batch = self.item_tensors(indices, pixels=not self.cached)
        index = torch.as_tensor(list(indices), dtype=torch.long)
        for key, value in self.cached.items():
            batch[key] = value[index]
        return batch


class TensorPool(TaskData):
    """Samples held as uint8 tensors (N, 3, H, W): images, condition maps, and their captions."""

    def __init__(self, images: torch.Tensor, conditions: torch.Tensor, captions: list[str],
                 scenes: list[Scene] | None = None) -> None:
        super().__init__()
        if not (images.shape == conditions.shape and images.shape[0] == len(captions)):
            raise ValueError(f"pool parts disagree: images {tuple(images.shape)}, conditions "
                             f"{tuple(conditions.shape)}, {len(captions)} captions")
        self.images, self.conditions, self.captions, self.scenes = images, conditions, captions, scenes

    def __len__(self) -> int:
        return len(self.captions)

    def item_tensors(self, indices: Sequence[int], pixels: bool = True) -> dict:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        batch = {
            "conditioning_pixel_values": self.conditions[index].float() / 255.0,
            "caption": [self.captions[i] for i in indices],
        }
        if pixels:
            batch["pixel_values"] = self.images[index].float() / 127.5 - 1.0
        return batch

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"pool {tuple(self.images.shape)} {self.images.dtype}\n".encode())
        digest.update(self.images.contiguous().numpy().data)
        digest.update(captions_bytes(self.captions))
        return digest.hexdigest()


class DatasetTaskData(TaskData):
    """A ``Dataset`` whose items are dicts of ``pixel_values`` / ``conditioning_pixel_values`` / ``caption``.

    A ``Subset`` (the shots of fine-tuning) is seen through: its source's folder and file list serve.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def _source(self) -> tuple[Dataset, Sequence[int]]:
        """The dataset under any ``Subset`` wrappers, and the indices into it of this data's samples."""
        dataset, indices = self.dataset, range(len(self))
        while isinstance(dataset, Subset):
            indices = [dataset.indices[i] for i in indices]
            dataset = dataset.dataset
        return dataset, indices

    @property
    def root(self) -> Path | None:
        """The image folder the samples come from (None for other datasets): caches go next to it."""
        root = getattr(self._source()[0], "root", None)
        return Path(root) if root is not None else None

    @property
    def captions(self) -> list[str]:
        """From the dataset's own caption list where it has one (no image decoded), else item by item."""
        dataset, indices = self._source()
        listed = getattr(dataset, "captions", None)
        if listed is None:
            return [self.dataset[i]["caption"] for i in range(len(self))]
        return [listed[i] for i in indices]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def subset(self, rows: range) -> DatasetTaskData:
        return DatasetTaskData(Subset(self.dataset, rows))

    def item_tensors(self, indices: Sequence[int], pixels: bool = True) -> dict:
        items = [self.dataset[i] for i in indices]  # a Dataset's items hold their pixels: decoded either way
        batch = {
            "conditioning_pixel_values": torch.stack([it["conditioning_pixel_values"] for it in items]),
            "caption": [it["caption"] for it in items],
        }
        if pixels:
            batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        return batch

    def fingerprint(self) -> str:
        """Over image files' bytes where the dataset lists its files, else over every item's pixels.

        An image folder has decoded each file once at construction, so re-reading the bytes is cheap;
        other datasets (saved HF ones) pay one pass of image decoding here.
        """
        dataset, indices = self._source()
        samples = getattr(dataset, "_samples", None)  # ImageFolderDataset's file list
        digest = hashlib.sha256()
        if samples is not None:
            digest.update(b"files\n")
            for i in indices:
                digest.update(hashlib.sha256(samples[i].image.read_bytes()).digest())
        else:
            digest.update(b"items\n")
            for i in range(len(self)):
                pixels = self.dataset[i]["pixel_values"]
                digest.update(f"{tuple(pixels.shape)}".encode())
                digest.update(pixels.contiguous().numpy().data)
        digest.update(captions_bytes(self.captions))
        return digest.hexdigest()


def batch_images(batch: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A batch's condition maps and images back as (H, W, 3) uint8 arrays (for grids and evaluation)."""
    maps = (batch["conditioning_pixel_values"] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    images = ((batch["pixel_values"] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return list(maps), list(images)


def captions_bytes(captions: Sequence[str]) -> bytes:
    """Length-prefixed, so no two caption lists hash alike by shifting text between neighbours."""
    encoded = [caption.encode() for caption in captions]
    return b"".join(len(data).to_bytes(8, "little") + data for data in encoded)


def warn_unknown_words(data: dict[str, TaskData], tokenizer: PreTrainedTokenizerBase) -> None:
    """Warn once per distinct caption list about words the tokenizer maps to its unknown token.

    A word-level tokenizer (the tiny model's) turns every word outside its vocabulary into ``<unk>``:
    "an astronaut in front of a flag" trains as "an <unk> in front of a <unk>", silently. Byte-level
    BPE tokenizers (CLIP's) never produce it: nothing to report there.
    """
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    tasks_of: dict[tuple[str, ...], list[str]] = {}
    for task, task_data in data.items():
        tasks_of.setdefault(tuple(task_data.captions), []).append(task)
    for captions, tasks in tasks_of.items():
        words = [re.findall(r"\w+", caption) for caption in captions]
        vocabulary = sorted({word for caption in words for word in caption})
        ids = tokenizer(vocabulary, add_special_tokens=False).input_ids if vocabulary else []
        unknown = {word for word, word_ids in zip(vocabulary, ids) if unk in word_ids}
        if not unknown:
            continue
        hits = sum(1 for caption in words if unknown.intersection(caption))
        common = Counter(word.lower() for caption in words for word in caption if word in unknown)
        examples = ", ".join(repr(word) for word, _ in common.most_common(UNKNOWN_EXAMPLES))
        logger.warning("%d of %d captions of %s contain words unknown to the tokenizer (e.g. %s); they become %s",
                       hits, len(captions), task_list(list(tasks)), examples, tokenizer.unk_token)


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def synthetic_pools(world: WorldConfig, tasks: Sequence[str], size: int, split: str = "train",
                    show_progress: bool = True, keep_scenes: bool = False, start: int = 0) -> dict[str, TensorPool]:
    """Render scenes ``start .. start + size - 1`` of ``split`` once and every task's condition map from each.

    ``keep_scenes`` keeps the ground truth too, for evaluation against it.
    """
    generator = SceneWorld(world)
    conditions = {task: get_condition(task) for task in tasks}
    offset = SPLIT_SEED_OFFSETS[split]
    images, maps, captions, scenes = [], {t: [] for t in tasks}, [], []
    for i in tqdm(range(start, start + size), desc=f"render {split} pool", disable=not show_progress):
        scene = generator.sample(offset + i)
        images.append(_chw(scene.image))
        captions.append(scene.caption)
        if keep_scenes:
            scenes.append(scene)
        for task, condition in conditions.items():
            maps[task].append(_chw(condition.render(scene)))
    image_tensor = torch.stack(images)
    return {task: TensorPool(image_tensor, torch.stack(maps[task]), captions, scenes or None) for task in tasks}
