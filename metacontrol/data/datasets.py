"""Torch datasets for ControlNet training: the synthetic world, image folders and saved HF datasets.

Every item is the dict diffusers' ``train_controlnet.py`` collates: ``pixel_values`` (3, H, W) float32
in [-1, 1], ``conditioning_pixel_values`` (3, H, W) float32 in [0, 1] and ``caption``. All three
sources go through ``to_example``, so a model cannot tell which one it is trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from metacontrol.conditions import get_condition
from metacontrol.config_loader import ConfigError, check
from metacontrol.data.annotation_cache import AnnotationCache
from metacontrol.data.images import (
    BLACK,
    WHITE,
    BadSampleError,
    BadSamplePolicy,
    OnBadSample,
    decode,
    load_rgb,
    pil_to_rgb,
)
from metacontrol.world import Scene, SceneWorld, WorldConfig

# Split s uses seeds SPLIT_SEED_OFFSETS[s] + index; the gap bounds split sizes so no scene is in two splits.
SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
MAX_SPLIT_SIZE = 1_000_000_000
METADATA_FILE = "metadata.jsonl"
CACHE_FOLDER = ".metacontrol_cache"  # hidden, so `datasets`' imagefolder loader does not pick the maps up


def to_example(image: np.ndarray, condition_map: np.ndarray, caption: str) -> dict[str, Any]:
    """(H, W, 3) uint8 image and condition map + caption -> the training dict (see the module docstring)."""
    for name, array in (("image", image), ("condition map", condition_map)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{name}: expected an (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    if image.shape != condition_map.shape:
        raise ValueError(f"image {image.shape} and condition map {condition_map.shape} differ in size")

    def channels_first(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))

    return {
        "pixel_values": channels_first(image) / 127.5 - 1.0,
        "conditioning_pixel_values": channels_first(condition_map) / 255.0,
        "caption": caption,
    }


class SyntheticDataset(Dataset):
    """Scenes of the synthetic world with a rendered (exact) condition map; item i is seed offset + i."""

    def __init__(self, world: WorldConfig, condition: str, split: str = "train", size: int = 10_000) -> None:
        check(split in SPLIT_SEED_OFFSETS, "split", split, "one of " + ", ".join(SPLIT_SEED_OFFSETS))
        allowed = f"an integer from 1 to {MAX_SPLIT_SIZE:_} (larger splits would overlap the next one)"
        check(isinstance(size, int) and 1 <= size <= MAX_SPLIT_SIZE, "size", size, allowed)
        self.condition = get_condition(condition)
        self.world = SceneWorld(world)
        self.split = split
        self.size = size

    def __len__(self) -> int:
        return self.size

    def seed(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for the {self.split} split of {self.size} scenes")
        return SPLIT_SEED_OFFSETS[self.split] + index

    def scene(self, index: int) -> Scene:
        """The raw scene behind item ``index``: evaluation needs its ground truth."""
        return self.world.sample(self.seed(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        return to_example(scene.image, self.condition.render(scene), scene.caption)


def is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True)
class _FolderSample:
    image: Path
    caption: str
    conditioning: Path | None  # a precomputed condition map; None: annotate the image
    where: str = ""  # its metadata line, for messages


def caption_keys_for(caption_column: str) -> tuple[str, ...]:
    """``caption`` is diffusers' other usual key; it stands in only for the default ``text``."""
    return (caption_column, "caption") if caption_column == "text" else (caption_column,)


def read_metadata(root: Path, caption_keys: tuple[str, ...], policy: BadSamplePolicy,
                  check_files: Callable[[_FolderSample], None] | None = None) -> list[_FolderSample]:
    """The samples ``root/metadata.jsonl`` lists whose files exist (see ``ImageFolderDataset`` for the format),
    each passed to ``check_files`` in order (None: no image is decoded; 100k lines take a second); bad ones go
    to ``policy``, with their metadata line named."""
    metadata = root / METADATA_FILE
    if not root.is_dir():
        raise BadSampleError(f"{root}: image folder not found", root)
    if not metadata.is_file():
        raise BadSampleError(
            f"{metadata}: not found; an image folder needs one line per image like "
            '{"file_name": "0001.png", "text": "a caption"}',
            metadata,
        )
    samples = []
    for number, line in enumerate(metadata.read_bytes().splitlines(), 1):
        if line.strip():
            where = f"{metadata} line {number}"
            try:
                sample = _parse_line(root, where, line, caption_keys)
                if check_files is not None:
                    check_files(sample)
            except BadSampleError as err:
                policy.reject(err if where in str(err) else BadSampleError(f"{err} (listed in {where})", err.path))
            else:
                samples.append(sample)
    return samples


def _parse_line(root: Path, where: str, line: bytes, caption_keys: tuple[str, ...]) -> _FolderSample:
    """One metadata line -> a sample whose files exist, or a BadSampleError saying why not."""
    try:
        entry = json.loads(line)
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise BadSampleError(f"{where}: not valid JSON ({err})", where) from None
    if not isinstance(entry, dict):
        raise BadSampleError(f"{where}: expected a JSON object, got {type(entry).__name__}", where)
    file_name = entry.get("file_name")
    if not is_text(file_name):
        raise BadSampleError(f"{where}: missing file_name", where)
    image = root / file_name
    caption = next((entry[key] for key in caption_keys if key in entry), None)
    if caption is None:
        expected = " or ".join(repr(key) for key in caption_keys)
        raise BadSampleError(
            f"{where}: no caption for {file_name} (expected a {expected} key; caption_column names it)", image
        )
    if not is_text(caption):
        raise BadSampleError(f"{where}: empty or non-text caption {caption!r} for {file_name}", image)
    conditioning_name = entry.get("conditioning_file_name")
    if conditioning_name is not None and not is_text(conditioning_name):
        raise BadSampleError(f"{where}: conditioning_file_name {conditioning_name!r} is not a file name", image)
    conditioning = root / conditioning_name if conditioning_name is not None else None
    for path in (image, conditioning):
        if path is not None and not path.is_file():
            raise BadSampleError(f"{where}: {path} is listed but does not exist", path)
    return _FolderSample(image, caption, conditioning, where)


class ImageFolderDataset(Dataset):
    """Real images in the diffusers ``imagefolder`` layout, with condition maps annotated and cached.

    ``root/metadata.jsonl`` has one JSON object per line: ``file_name``, the caption under
    ``caption_column`` (default ``text``, which also accepts ``caption``) and optionally
    ``conditioning_file_name``, a precomputed map used instead of annotating.
    Every listed file is decoded once at construction, and bad ones handled by ``on_bad_sample`` (see
    ``metacontrol.data.images``); ``skipped`` lists (path, reason) of those left out. One sample is
    annotated at construction too, so missing annotator weights stop the run before training starts.
    Maps are cached under ``cache_dir`` (default ``root/.metacontrol_cache``).
    """

    def __init__(
        self,
        root: str | Path,
        condition: str,
        resolution: int,
        annotators: str | None = None,
        cache_dir: str | Path | None = None,
        on_bad_sample: OnBadSample = "error",
        caption_column: str = "text",
    ) -> None:
        check(isinstance(resolution, int) and resolution >= 1, "resolution", resolution, "a positive integer")
        self.root = Path(root)
        self.caption_keys = caption_keys_for(caption_column)
        self.condition = get_condition(condition)
        self.resolution = resolution
        self.annotators = annotators
        self.cache = AnnotationCache(cache_dir if cache_dir is not None else self.root / CACHE_FOLDER)
        policy = BadSamplePolicy(on_bad_sample)
        self._samples = self._index(policy)
        self.skipped = policy.skipped
        to_annotate = next((i for i, s in enumerate(self._samples) if s.conditioning is None), None)
        if to_annotate is not None:
            self._load(to_annotate)

    def _index(self, policy: BadSamplePolicy) -> list[_FolderSample]:
        def decodes(sample: _FolderSample) -> None:
            for path in (sample.image, sample.conditioning):
                if path is not None:
                    load_rgb(path, self.resolution)

        samples = read_metadata(self.root, self.caption_keys, policy, decodes)
        listed = len(samples) + len(policy.skipped)
        policy.report(listed, self.root)
        if not samples:
            raise BadSampleError(f"{self.root}: no usable samples ({listed} listed in {METADATA_FILE}, "
                                 f"{len(policy.skipped)} skipped as bad)", self.root)
        return samples

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def captions(self) -> list[str]:
        return [sample.caption for sample in self._samples]

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        sample = self._samples[index]
        image = load_rgb(sample.image, self.resolution)
        if sample.conditioning is not None:
            condition_map = load_rgb(sample.conditioning, self.resolution, background=BLACK)
        else:
            condition_map = self.cache.get_or_compute(
                image,
                self.condition,
                self.annotators,
                lambda: self.condition.annotate(image, self.annotators),
            )
        return image, condition_map, sample.caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        return to_example(*self._load(index))


class HuggingFaceDataset(Dataset):
    """A ``datasets`` dataset saved with ``save_to_disk``, in the columns of diffusers' ControlNet example.

    Image columns must be ``datasets.Image`` features. ``split`` picks from a saved DatasetDict and is
    ignored for a single Dataset. Every row is read once at construction, as an image folder's files are,
    so a bad row stops (or is skipped) before training starts rather than deep in a step: both images
    must decode and convert, the caption must be non-empty text. Bad rows (``<path>[i]``) are handled by
    ``on_bad_sample``; ``skipped`` lists (row, reason) of those left out, and indexing and ``captions``
    go over the kept rows. ``read_all=False`` (``metacontrol prepare``, which reads rows in DataLoader
    workers) skips that pass: every row is kept and ``read(i)`` meets a bad one. A null
    ``conditioning_image_column`` reads images only (``read`` gives no map: the caller annotates).
    """

    IMAGE_KEYS = ("image_column", "conditioning_image_column")

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        image_column: str = "image",
        conditioning_image_column: str | None = "conditioning_image",
        caption_column: str = "text",
        split: str = "train",
        on_bad_sample: OnBadSample = "error",
        read_all: bool = True,
    ) -> None:
        import datasets  # importing it takes a second; only this source needs it

        check(isinstance(resolution, int) and resolution >= 1, "resolution", resolution, "a positive integer")
        policy = BadSamplePolicy(on_bad_sample)
        self.path = Path(path)
        self.resolution = resolution
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"{path}: no split {split!r}; available splits: {', '.join(loaded)}")
            loaded = loaded[split]
        self.columns = {"image_column": image_column, "conditioning_image_column": conditioning_image_column,
                        "caption_column": caption_column}  # fmt: skip
        self.columns = {key: column for key, column in self.columns.items() if column is not None}
        self.image_keys = [key for key in self.IMAGE_KEYS if key in self.columns]
        for key, column in self.columns.items():
            if column not in loaded.column_names:
                available = ", ".join(loaded.column_names)
                raise ConfigError(
                    f"{path}: column {column!r} ({key}) not found; available columns: {available}"
                )
        for key in self.image_keys:
            feature = loaded.features[self.columns[key]]
            if not (isinstance(feature, datasets.Image) and feature.decode):
                raise ConfigError(
                    f"{path}: column {self.columns[key]!r} ({key}) holds {feature}, not decoded images; "
                    f"cast it with dataset.cast_column({self.columns[key]!r}, datasets.Image())"
                )
        if len(loaded) == 0:
            raise BadSampleError(f"{path}: the dataset has no rows", path)
        # Rows hold the images' encoded bytes; ``_read`` decodes them itself, so a broken one is a bad sample.
        self._features = {self.columns[key]: loaded.features[self.columns[key]] for key in self.image_keys}
        data = loaded.select_columns(list(dict.fromkeys(self.columns.values())))
        for column in self._features:
            data = data.cast_column(column, datasets.Image(decode=False))
        self._data = data
        self._rows: list[int] = []  # indices of the kept rows in the saved dataset
        self._captions: list[str] = []
        self.skipped = policy.skipped
        if not read_all:
            self._rows = list(range(len(data)))
            return
        for index, row in enumerate(data):
            try:
                caption = self._read(index, row)[2]
            except BadSampleError as err:
                policy.reject(err)
            else:
                self._rows.append(index)
                self._captions.append(caption)
        policy.report(len(data), self.path)
        if not self._rows:
            raise BadSampleError(f"{path}: no usable samples ({len(data)} rows, all skipped as bad)", path)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def captions(self) -> list[str]:
        """The kept rows' captions, read at construction: listing them decodes no image."""
        return self._captions

    def _image(self, where: str, row: dict[str, Any], key: str, background: tuple[int, int, int]) -> np.ndarray:
        column = self.columns[key]
        source = f"{where}.{column}"
        if row[column] is None:
            raise BadSampleError(f"{source}: no image", source)
        image = decode(lambda: self._features[column].decode_example(row[column]), source)
        return pil_to_rgb(image, self.resolution, source, background)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Row ``index`` of the saved dataset (kept or not) as (image, condition map or None, caption)."""
        return self._read(index, self._data[index])

    def _read(self, index: int, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Row ``index`` of the saved dataset as (image, condition map, caption), or a BadSampleError naming it."""
        where = f"{self.path}[{index}]"
        caption = row[self.columns["caption_column"]]
        if not is_text(caption):
            raise BadSampleError(f"{where}: empty or non-text caption {caption!r}", where)
        image = self._image(where, row, "image_column", WHITE)
        has_map = "conditioning_image_column" in self.columns
        condition_map = self._image(where, row, "conditioning_image_column", BLACK) if has_map else None
        return image, condition_map, caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows[index]
        return to_example(*self._read(row, self._data[row]))
